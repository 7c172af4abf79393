"""Top SASS lines by warp-stall samples from an `ncu --page source --csv --print-source sass` export.

    ncu --set full -k regex:NAME -c 1 -o prof python3 ...; ncu -i prof.ncu-rep --page source --csv --print-source sass > src.csv
    python scripts/ncu_hotspots.py src.csv [N]
"""
import csv
import sys


def main():
    path = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with open(path, newline="") as f:
        # skip ncu's log lines and the "Kernel Name" line that precedes the CSV header
        lines = [l for l in f if l.strip() and not l.startswith("==") and not l.startswith('"Kernel Name"')]
    rows = list(csv.DictReader(lines))
    if not rows:
        print("no rows")
        return
    keys = list(rows[0].keys())
    col = next((k for k in keys if "Warp Stall Sampling (All" in k), None)
    src = next((k for k in keys if k.strip() in ("Source", "# Source")), keys[1])
    addr = next((k for k in keys if "Address" in k), keys[0])
    if col is None:
        print("columns:", keys)
        return

    def num(v):
        try:
            return float(str(v).replace(",", ""))
        except ValueError:
            return 0.0

    total = sum(num(r[col]) for r in rows)
    print(f"{len(rows)} SASS lines, {total:.0f} stall samples")
    for i, r in enumerate(rows):
        r["_i"] = i
    for r in sorted(rows, key=lambda r: -num(r[col]))[:n]:
        print(f"{num(r[col]) / max(total, 1) * 100:5.1f}%  #{r['_i']:5d} {r[addr]}  {r[src][:110]}")


if __name__ == "__main__":
    main()
