"""Evaluate a quantized student (FID, sFID, IS, fidelity to the FP model). Lands with issue #5."""

if __name__ == "__main__":
    raise SystemExit("evaluate.py: not implemented yet (issue #5)")
