#!/usr/bin/env bash
# Replays "what MINUTES of 2-core CPU training would give" on a CUDA GPU, several recipes at once: each
# recipe trains exactly the number of steps the CPU reaches in that budget (its samples/s measured by
# research.training_recipes on the CPU), so the scores predict a CPU run's in seconds instead of half an hour.
# The rows' train_seconds are the GPU's own time for the same run. Run it from the repository root:
#
#   MINUTES=30 OUT=outputs/gpu bash research/gpu_replay.sh "base" "v-prediction" ...
set -u
out=${OUT:-outputs/gpu}
minutes=${MINUTES:-30}
rates=${RATES:-research/training_recipes.json,research/recipe_rates.json}
py=${PYTHON:-python3}
mkdir -p "$out/parts"
nvidia-smi -L || true
i=0
for name in "$@"; do
  OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1 "$py" -m research.training_recipes --device cuda --minutes "$minutes" \
    --cpu-rates "$rates" --only "$name" --out "$out/parts/$i.json" >"$out/parts/$i.log" 2>&1 &
  i=$((i + 1))
done
wait
"$py" - "$out" "$minutes" "$@" <<'EOF'
import json, shlex, sys
from pathlib import Path
out, minutes, names = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
rows, meta = [], {}
for part in sorted((out / "parts").glob("*.json"), key=lambda p: int(p.stem)):
    d = json.loads(part.read_text())
    rows += d["rows"]
    meta = {k: v for k, v in d.items() if k not in ("rows", "commands")}
meta["command"] = f"MINUTES={minutes:g} bash research/gpu_replay.sh " + shlex.join(names)
meta["note"] = f"GPU replay: each recipe trained the steps a 2-core CPU reaches in {minutes:g} min"
(out / "gpu_replay.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
logs = "".join(f"== {p.name}\n{p.read_text()[-3000:]}\n" for p in sorted((out / "parts").glob("*.log")))
(out / "gpu_replay.log").write_text(logs)
for r in rows:
    print(f"{r['name']:24s} {r['steps']:6d} steps {r['train_seconds']:6.1f} s  guided {r['guided_accuracy']:.1%}"
          f"  FID {r['fid']:.2f}  {r['per_class']}")
EOF
rm -rf "$out/parts"
