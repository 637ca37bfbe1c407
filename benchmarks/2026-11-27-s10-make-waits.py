"""Variant trees of src/ without some PDL waits (timing only: results are wrong without them).
Run from the repository root; the variants land in .exp/waits/<name>/src."""

import pathlib
import shutil

root = pathlib.Path(".exp/waits")
variants = {  # name: (in_proj waits, state update waits, out_proj waits, every GEMV early)
    "base": (1, 1, 1, 0),
    "early": (1, 1, 1, 1),
    "noin": (0, 1, 1, 1),
    "nossm": (1, 0, 1, 1),
    "noout": (1, 1, 0, 1),
    "none": (0, 0, 0, 1),
}
for name, (win, wssm, wout, early) in variants.items():
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree("src", d / "src")
    g = d / "src/aim_hf/triton_gemv.py"
    s = g.read_text()
    old = "        if PDL:\n            tl.extra.cuda.gdc_wait()\n            if EARLY:\n                tl.extra.cuda.gdc_launch_dependents()\n"
    assert old in s
    new = (
        f"        if PDL:\n            if (TAPS > 0 and {bool(win)}) or (RESIDUAL and {bool(wout)}) or (TAPS == 0 and not RESIDUAL):\n"
        "                tl.extra.cuda.gdc_wait()\n            if EARLY:\n                tl.extra.cuda.gdc_launch_dependents()\n"
    )
    s = s.replace(old, new)
    if early:
        s = s.replace('"early": widens and outputs * inputs < 8_000_000,', '"early": True,')
        s = s.replace(
            'return {"block_n": 4, "block_k": padded, "stages": 0, "num_warps": 4, "early": False}',
            'return {"block_n": 4, "block_k": padded, "stages": 0, "num_warps": 4, "early": True}',
        )
        assert s.count('"early": True') == 2, name
    g.write_text(s)
    t = d / "src/aim_hf/triton_ssm.py"
    s = t.read_text()
    old = "            tl.extra.cuda.gdc_wait()\n            tl.extra.cuda.gdc_launch_dependents()\n"
    assert old in s
    if not wssm:
        s = s.replace(old, "            tl.extra.cuda.gdc_launch_dependents()\n")
    t.write_text(s)
    print(name, "ok")
