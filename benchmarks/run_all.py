"""Run every CPU benchmark in turn (`make bench`); each prints its own JSON lines and table (docs/performance.md).

Pass-through: `python benchmarks/run_all.py [NAME ...]` runs only the named scripts (e.g. model_cpu sampler).
"""
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = {
    "procedural_gen": ["bench_procedural_gen.py"],
    "model_cpu": ["bench_model_cpu.py"],
    "model_cpu_moe": ["bench_model_cpu.py", "--moe"],
    "sampler": ["bench_sampler.py"],
    "sampler_moe": ["bench_sampler.py", "--moe"],
    "train_step": ["bench_train_step.py"],
    "train_step_moe": ["bench_train_step.py", "--models", "moe"],
    "attention_cpu": ["bench_attention_cpu.py"],
    "compile": ["bench_compile.py"],
    "rollout": ["bench_rollout.py"],
}


def main(names):
    unknown = [n for n in names if n not in SCRIPTS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; choose from {sorted(SCRIPTS)}")
    failed = []
    for name in names or SCRIPTS:
        script, *args = SCRIPTS[name]
        print(f"\n=== {name}: {script} {' '.join(args)}", flush=True)
        if subprocess.call([sys.executable, str(HERE / script), *args]) != 0:
            failed.append(name)
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main(sys.argv[1:])
