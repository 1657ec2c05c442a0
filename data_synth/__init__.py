"""Data flywheels: teacher client (`teachers`), agentic and reasoning synthesis stages, round datasets.

Entry points: `data_synth.run.run_round(config, round_idx, failures=None) -> RoundResult` and
`python -m data_synth.run --config=configs/synth_tiny.py --round=R`.
"""
