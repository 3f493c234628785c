"""The resources of each default tile configuration from a compile-check report, as a Markdown table (for NOTES.md).

    python benchmarks/compile_check_table.py benchmarks/results/compile_check_triton3.8.json

A row per (kernel, dtype, head dim, shape) launched with each caller's default switches (no softcap, VAR's paper
rule, attention without the LSE, ACT's decode logits); per arch: registers, spills, shared KiB, blocks x warps per SM
and what limits them.
"""

from __future__ import annotations

import json
import re
import sys

DEFAULT_CASES = re.compile(
    r"^(attention lse=False|act\.flash logits=(False splits=1|True)|var paper|column_mass|act\.sink_correction"
    r"|outlook\.)[^|]*\| (?P<dtype>\w+) (?P<rest>.*)$"
)


def rows(report: dict) -> dict:
    table: dict = {}
    for e in report["entries"]:
        for case in e["cases"]:
            m = DEFAULT_CASES.match(case)
            if m is None or "softcap" in case:
                continue
            c = e["constexprs"]
            tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_P", "BLOCK_W", "BLOCK_C") if k in c)
            op = m[1].rstrip(".")
            key = (
                e["kernel"].rsplit(".", 1)[-1],
                op,
                m["dtype"],
                m["rest"],
                tile,
                e.get("num_warps"),
                e.get("num_stages"),
            )
            table.setdefault(key, {})[e["arch"]] = e
    return table


def cell(e: dict | None) -> str:
    if e is None:
        return "-"
    if not e["ok"]:
        return "compile error"
    return (
        f"{e['registers']} / {e['spills']} / {e['shared'] / 1024:.0f} / "
        f"{e['blocks_per_sm']}x{e['num_warps']}={e['warps_per_sm']} ({e['limited_by']})"
    )


def main(path: str) -> None:
    report = json.load(open(path))
    archs = list(report["archs"])
    print(f"Triton {report['triton']}; per arch: registers / spill bytes / shared KiB / blocks x warps = warps per SM")
    print()
    print("| kernel | launched by | dtype | case | tile | warps, stages | " + " | ".join(archs) + " |")
    print("|---" * (6 + len(archs)) + "|")
    for (kernel, op, dtype, rest, tile, warps, stages), by_arch in sorted(rows(report).items()):
        cells = " | ".join(cell(by_arch.get(a)) for a in archs)
        print(f"| {kernel} | {op} | {dtype} | {rest} | {tile} | {warps}, {stages} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1])
