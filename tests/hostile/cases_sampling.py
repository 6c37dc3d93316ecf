"""sample.py's sampling flags, refused before any checkpoint loads."""

from hostile import Case


def _sample(*args):
    def run(tmp):
        import sample
        raise SystemExit(sample.main(["--checkpoint", str(tmp), "--prompt", "hi", *args]))
    return run


CASES = [
    Case("--top-k 2**31", _sample("--top-k", str(2**31)), r"--top-k=2147483648: expected .* below 2\*\*31"),
    Case("--seed 2**63", _sample("--seed", str(2**63)), r"--seed=9223372036854775808: expected an integer"),
    Case("--temperature nan", _sample("--temperature", "nan"), r"--temperature=nan: expected 0 \(greedy\)"),
    Case("--temperature inf", _sample("--temperature", "inf"), r"--temperature=inf"),
    Case("--top-p nan", _sample("--top-p", "nan"), r"--top-p=nan: expected a probability"),
]
