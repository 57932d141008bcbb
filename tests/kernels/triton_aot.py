"""Old entry point of the compile report, kept as a shim over lepton_kernels.compile.

    python -m tests.kernels.triton_aot --arch 90 --dtype fp16 --case <case> --table --spills

Same flags and JSON as before ({"error", "results": [{case, arch, dtype, kernel, ok, error,
seconds, regs, shared, stack, spill_stores, spill_loads, num_warps, num_stages, ...}]}); new
code should call ``lepton kernels --compile`` (or ``python -m lepton_kernels.compile``).
"""

from __future__ import annotations

import argparse
import json
import sys

from lepton_kernels.compile import report

OLD_KEYS = {"registers": "regs", "shared_bytes": "shared"}


def _old_row(record: dict) -> dict:
    row = {OLD_KEYS.get(k, k): v for k, v in record.items()}
    row["arch"] = int(record["arch"].removeprefix("sm_"))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, action="append", help="80, 90, ... (default: 80 and 90)")
    p.add_argument("--dtype", action="append", choices=sorted(report.TORCH_DTYPES),
                   help="default: fp16, bf16, fp32")
    p.add_argument("--full", action="store_true", help="every case, not just the quick subset")
    p.add_argument("--case", action="append", help="only these cases")
    p.add_argument("--spills", action="store_true", help="accepted; spills are always reported")
    p.add_argument("--table", action="store_true", help="print a table instead of JSON")
    a = p.parse_args(argv)
    try:
        out = report.run(a.arch or [80, 90], a.dtype or ["fp16", "bf16", "fp32"],
                         report.select(a.case, quick=not a.full))
    except Exception as err:  # report, never crash obscurely
        out = {"error": f"compile report crashed: {type(err).__name__}: {err}", "records": []}
    if a.table:
        if out.get("error") or out.get("skip"):
            print(out.get("error") or f"skip: {out['skip']}")
        sys.stdout.write(report.table(out["records"]))
        for r in out["records"]:
            if not r["ok"]:
                print(f"{r['config']} {r['kernel']} {r['arch']}:\n    "
                      + (r["error"] or "").replace("\n", "\n    ")[:3000])
    else:
        json.dump({"error": out.get("error"), "skip": out.get("skip"),
                   "results": [_old_row(r) for r in out["records"]]}, sys.stdout)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
