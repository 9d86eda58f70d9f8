#!/usr/bin/env bash
# Where one kernel of the expert-choice routing stalls, per SASS instruction (Nsight Compute
# warp-state sampling), on a GPU machine with ncu, from the repository root:
#
#     E=60 K=4 T=64 KERNEL=cluster_route bash benchmarks/ncu_stalls.sh
#
# Prints the kernel's cycles per issued instruction, the stall reasons over all samples,
# the share of samples per 2 KiB of code, the 30 instructions with most samples, and the
# executed warp instructions per launch with the 10 most executed instructions.
# Caches are not flushed between replays (--cache-control none): a CUDA-graph replay
# finds the kernel's code and parameters as the previous launch left them; with ncu's
# default flush the instruction-fetch stalls read about twice as high (session 4).
set -euo pipefail
E=${E:-60}; K=${K:-4}; T=${T:-64}; KERNEL=${KERNEL:-cluster_route}
rep=${TMPDIR:-/tmp}/ec_stalls
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "from sgl_ecpatch.runtime import kernel; m, r = kernel.try_load(); assert m is not None, r"
ncu --clock-control none --cache-control none -k "regex:$KERNEL" -c 8 --section SourceCounters \
    --section WarpStateStats --warp-sampling-interval 0 -f -o "$rep" \
    python3 benchmarks/ncu_target.py --tokens "$T" --experts "$E" --top-k "$K" --calls 10 2>&1 | { grep -v '^==PROF== Profiling' || true; }
ncu -i "$rep.ncu-rep" --page details --section WarpStateStats | grep -m1 "Warp Cycles Per Issued"
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.csv"
python3 - "$rep.csv" <<'PY'
import collections, csv, sys
rows = list(csv.reader(open(sys.argv[1])))
head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
hdr = rows[head]
col = {c: i for i, c in enumerate(hdr)}
reasons = [c for c in hdr if c.startswith("stall_") and "Not Issued" not in c]
ALL = "Warp Stall Sampling (All Samples)"
# Executed instructions (warp level), where the report has them: one row per address and
# profiled launch, so the rows of an address are summed here and divided by their number.
EXE = "Instructions Executed"
counted = [ALL] + ([EXE] if EXE in col else [])
agg, text, nrows = collections.defaultdict(collections.Counter), {}, collections.Counter()
for r in rows[head + 1:]:
    if len(r) < len(hdr) or not r[0].startswith("0x"):
        continue
    text[r[0]] = r[col["Source"]].strip()
    nrows[r[0]] += 1
    for c in reasons + counted:
        try:
            agg[r[0]][c] += float(r[col[c]] or 0)
        except ValueError:
            pass
total = sum(v[ALL] for v in agg.values()) or 1.0
by_reason = collections.Counter()
for v in agg.values():
    for c in reasons:
        by_reason[c] += v[c]
print(f"samples {total:.0f}; by reason: " + ", ".join(f"{c[6:]} {n / total:.0%}" for c, n in by_reason.most_common(8)))
windows = collections.Counter()
for a, v in agg.items():
    windows[int(a, 16) // 0x800] += v[ALL]
base = min(windows) if windows else 0
print("by 2 KiB of code (offset: share): " + " ".join(
    f"{(w - base) * 0x800:#x}: {n / total:.0%}" for w, n in sorted(windows.items()) if n > 0.02 * total))
for a in sorted(agg, key=lambda a: -agg[a][ALL])[:30]:
    v = agg[a]
    top = ", ".join(f"{c[6:]} {v[c]:.0f}" for c in sorted(reasons, key=lambda c: -v[c])[:2])
    print(f"{int(a, 16) - base * 0x800:#8x} {v[ALL]:6.0f}  [{top}]  {text[a][:70]}")
if EXE in col:
    launches = max(nrows.values()) if nrows else 1
    per = {a: v[EXE] / launches for a, v in agg.items()}
    print(f"executed warp instructions per launch ({launches} launches): {sum(per.values()):.0f}")
    for a in sorted(per, key=lambda a: -per[a])[:10]:
        print(f"{int(a, 16) - base * 0x800:#8x} {per[a]:9.0f}  {text[a][:70]}")
PY
