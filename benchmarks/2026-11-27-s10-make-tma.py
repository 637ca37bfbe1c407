"""A tree of src/ whose pipelined GEMVs (in_proj) read their weights by TMA when AIM_TMA=1."""
import pathlib, shutil
d = pathlib.Path(".exp/tma")
shutil.rmtree(d, ignore_errors=True)
shutil.copytree("src", d / "src", ignore=shutil.ignore_patterns("pretrained"))
g = d / "src/aim_hf/triton_gemv.py"
s = g.read_text()
def sub(old, new):
    global s
    assert old in s, old
    s = s.replace(old, new)
sub("import math\n", "import math\nimport os\n")
sub("        win_ptr, tap_ptr, tb_ptr, first, channels, v_b, v_c, v_k, t_c, t_k,\n",
    "        win_ptr, tap_ptr, tb_ptr, first, channels, v_b, v_c, v_k, t_c, t_k, w_desc,\n")
sub("TAP_BIAS: tl.constexpr,\n    ):  # fmt: skip", "TAP_BIAS: tl.constexpr, TMA: tl.constexpr,\n    ):  # fmt: skip")
sub("                    w = tl.load(w_block + start * w_k, mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)\n",
    "                    if TMA:\n                        w = w_desc.load([tl.program_id(1) * BLOCK_N, start])\n"
    "                    else:\n                        w = tl.load(w_block + start * w_k, mask=(n < N)[:, None] & (k < K)[None, :], other=0.0)\n")
sub("    _gemv_kernel[(triton.cdiv(m, rows), triton.cdiv(n, launch[\"block_n\"]))](\n",
    "    tma = os.environ.get(\"AIM_TMA\") == \"1\" and launch[\"stages\"] > 0\n"
    "    if tma:\n        from triton.tools.tensor_descriptor import TensorDescriptor\n"
    "        w_desc = TensorDescriptor.from_tensor(weight, [launch[\"block_n\"], launch[\"block_k\"]])\n"
    "    else:\n        w_desc = weight\n"
    "    _gemv_kernel[(triton.cdiv(m, rows), triton.cdiv(n, launch[\"block_n\"]))](\n")
sub("        *(window.stride() if conv else (0, 0, 0)), *(taps.stride() if conv else (0, 0)),\n",
    "        *(window.stride() if conv else (0, 0, 0)), *(taps.stride() if conv else (0, 0)), w_desc,\n")
sub("        ONE_BLOCK=launch[\"stages\"] == 0 and launch[\"block_k\"] >= k,\n",
    "        ONE_BLOCK=launch[\"stages\"] == 0 and launch[\"block_k\"] >= k, TMA=tma,\n")
g.write_text(s)
print("ok")
