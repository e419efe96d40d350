"""Print the headline figures of a generate_speed.py JSON: probes, bounds, ratios, each run's speed."""

import json
import sys

d = json.load(open(sys.argv[1]))
for key in ("hbm_probe", "h2d_probe", "bound", "ratios", "parity"):
    if key in d:
        print(key, json.dumps(d[key], indent=0)[:2000])
for label, r in d.get("runs", {}).items():
    print(label, r.get("tok_s"), r.get("error", ""), "kernels" if r.get("fused_kernels") else "",
          r.get("memory", {}).get("ratio_to_bound"))
