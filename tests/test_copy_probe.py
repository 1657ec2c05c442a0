"""benchmarks/copy_probe.py: teacher-forced accuracy on gold episodes, counted per token class. Predictors
with a known answer (the gold itself; the gold with every chosen value replaced by the enum's first option)
and a run directory as training writes it (config.json, tokenizer/, an HF export or a checkpoint)."""
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import copy_probe  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from agq_jax import tokenizer_procedural as ptok
    from agq_jax.driver.vocab import procedural_corpus
    from agq_jax.run_config.core import load

    rc = load(str(ROOT / "configs" / "tiny.py"))
    tok = ptok.train_procedural_tokenizer(procedural_corpus(n_tasks=120, n_problems=10), 2048,
                                          tmp_path_factory.mktemp("probe") / "tokenizer", pretokenizer="phrases")
    return rc, tok


def _shifted(x):
    return list(x[1:]) + [0]                     # predicts every next token right


def test_gold_predictor_is_right_everywhere(setup):
    rc, tok = setup
    r = copy_probe.probe(rc, tok, _shifted, n_tasks=1)
    assert {k.split("/")[1] for k in r["accuracy"]} == {"choice", "digit", "text"}
    assert all(v["accuracy"] == 1.0 and v["n"] > 0 for v in r["accuracy"].values())
    assert r["swaps"] == {} and r["choice_errors_first_option"] == {"legal": (0, 0), "clarification": (0, 0)}


def test_first_option_predictor_is_counted_as_such(setup):
    """A predictor that always writes the enum's first option: right exactly where gold chose it, and every
    error is a first-option error, with the swaps naming the values."""
    rc, tok = setup
    from agq_jax.envs.users import wanted_options
    from agq_jax.envs.worlds.generator import all_domains, generate_task, Knobs

    firsts = {}
    for d in all_domains():
        (_, opts), = wanted_options(generate_task(d, "legal", 1, Knobs(level=0)))
        if not opts[0][:1].isdigit():
            firsts[d] = opts

    def first_option(x):
        """The gold next token, except inside the second option's text: the first option's tokens there."""
        nxt = _shifted(x)
        classes = copy_probe.token_classes(tok, nxt, [o for opts in firsts.values() for o in opts])
        out = []
        for t, c in zip(nxt, classes):
            s = tok.decode([t])
            for opts in firsts.values():
                if c == "choice" and copy_probe._value(s, opts) == opts[1]:
                    enc = tok.encode(s.replace(opts[1], opts[0]) if opts[1] in s else opts[0], add_special_tokens=False)
                    t = enc[0]
            out.append(t)
        return out

    r = copy_probe.probe(rc, tok, first_option, n_tasks=2)
    for b in ("legal", "clarification"):
        acc = r["accuracy"][f"{b}/choice"]
        n_first, n_err = r["choice_errors_first_option"][b]
        assert n_err == acc["n"] - acc["right"] > 0
        assert r["accuracy"][f"{b}/text"]["accuracy"] == r["accuracy"][f"{b}/digit"]["accuracy"] == 1.0
    assert any(" -> " + opts[0] in k for k in r["swaps"] for opts in firsts.values())
    assert all(k.split(": ")[1].split(" -> ")[0] != k.split(" -> ")[1] for k in r["swaps"])


def test_probe_of_a_run_directory(tmp_path, setup):
    """The CLI path: a run dir with config.json, tokenizer/ and export/round_1 (a random tiny Qwen3 in our
    own HF writer) loads and is probed; a random model copies nothing."""
    from flax import nnx

    from agq_jax.driver.build import vocab_info
    from agq_jax.models import qwen3
    from agq_jax.run_config import dump, model_config
    from agq_jax.tokenizer import SpecialIds

    rc, tok = setup
    run = tmp_path / "run"
    tok.save_pretrained(str(run / "tokenizer"))
    dump(rc, str(run / "config.json"))
    cfg = model_config(rc, vocab=vocab_info(rc, tok, SpecialIds.of(tok)))
    qwen3.save_pretrained(qwen3.Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0)), run / "export" / "round_1")
    r = copy_probe.probe_run(str(run), "round_1", n_tasks=1)
    assert r["accuracy"]["legal/choice"]["n"] > 0
    assert r["accuracy"]["legal/digit"]["accuracy"] < 0.5
    # the same weights as the trainer checkpoints them (an SFT-only run has no export): the same probe
    from agq_jax.driver.build import trainer_configs
    from agq_jax.rl.checkpoint import CheckpointManager
    from agq_jax.rl.step import Trainer

    trainer = Trainer(qwen3.from_pretrained(run / "export" / "round_1"), *trainer_configs(rc, "sft"))
    with CheckpointManager(run / "checkpoints", async_save=False) as mngr:
        mngr.save(3, {"train": trainer.state}, {"round": 0})
    shutil.rmtree(run / "export")
    assert copy_probe.probe_run(str(run), "checkpoint", n_tasks=1)["accuracy"] == r["accuracy"]


def test_a_listing_of_the_options_is_not_a_choice(setup):
    """The agent's "(landlord or savings)?" is fixed text; "(payee: savings)?" and the call's value are the choice."""
    _, tok = setup
    opts = ["landlord", "savings"]

    def choice_text(text):
        ids = tok.encode(text, add_special_tokens=False)
        return "".join(tok.decode([i]) for i, c in zip(ids, copy_probe.token_classes(tok, ids, opts)) if c == "choice")

    assert choice_text("which payee do you want (landlord or savings)?") == ""
    assert "savings" in choice_text("Shall I send $120 from it (payee: savings)?")
    assert "landlord" in choice_text('{"payee": "landlord", "amount": 120}')
    assert choice_text("Account A-4840 is active.") == ""
