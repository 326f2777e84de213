"""
Fork probe (toy world; paper sections 6.4-6.5): where the checked style (H) ends and the checked-twice style
(H2) goes on verifying, which way does each model go? Teacher-forced on each toy_math test row's two
reference completions up to the token where they part (after the recount line), it reports each model's
probability of H's next token ("####", commit the answer) and of H2's ("Let me verify again").

Why: the undistillable teacher prefers to keep verifying there, and H2 never fits the student's window, so a
student that learns the teacher's preference runs out of room before its answer (the misled collapse). On-policy
reverse KL moves a student's logit by s_k (log s_k / t_k - KL): where the student gives the teacher's branch ~0
probability, the gradient is ~0, and only SFT / forward KL on the teacher's own text put the branch there.
This probe shows which happened (common.branch_probs).

    python probe.py --data runs/toy/00_toy_world/data --out_dir runs/toy/probe \
        --models student=runs/toy/00_toy_world/student,misled=runs/toy/03_distill/rkl_undistillable/model   # ~10 s

Writes out_dir/config.json (first) and probe.json ({model: {p_commit, p_verify, n}}, means over the rows
whose prefix fits the model's window), and prints one line per model. run_all.sh runs it on the toy world.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# ----------------------------------------------------------------------------- config
p = argparse.ArgumentParser(description="Fork probe: P(commit) vs P(verify again) where H and H2 part (toy world)")
p.add_argument("--models", required=True, help="comma list name=path (HF folders of the toy world's tokenizer A)")
p.add_argument("--data", required=True, help="the toy world's data folder (D/data): its rows carry every style's reference")
p.add_argument("--task", default="toy_math", help="a toy task whose rows have both styles")
p.add_argument("--styles", default="H,H2", help="the two reference styles: the one that commits, the one that goes on")
p.add_argument("--n_prompts", type=int, default=200, help="test rows (all 200 by default)")
p.add_argument("--out_dir", required=True, help="where probe.json goes")
p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
p.add_argument("--device", default="auto", help="cpu | cuda | auto")
args = common.parse_args(p)
styles = common.csv_list(args.styles)
if len(styles) != 2 or args.n_prompts < 1:
    common.die(f"--styles {args.styles} --n_prompts {args.n_prompts}: give two styles (default H,H2) and at least 1 prompt")
a, b = styles
models = dict(m.split("=", 1) for m in common.csv_list(args.models) if "=" in m)
if len(models) != len(common.csv_list(args.models)):
    common.die(f"--models {args.models}: each entry is name=path")
for name, path in models.items():
    if (err := common.model_missing(path)):
        common.die(f"--models {name}: {err}")
if args.threads:
    torch.set_num_threads(args.threads)

# ----------------------------------------------------------------------------- setup
common.write_config(args.out_dir, args)
rows = common.load_task(args.task, split="test", data=args.data)[:args.n_prompts]
if not rows or any(s not in (r.get("meta") or {}).get("reference", {}) for r in rows for s in (a, b)):
    common.die(f"{args.data}: the {args.task} test rows do not carry {a} and {b} reference completions "
               f"(a toy world's data folder made by 00_toy_world.py does)")

# ----------------------------------------------------------------------------- probe
out, t0 = {}, time.time()
for name, path in models.items():
    tok, model = common.load_tokenizer(path), common.load_model(path, device=args.device)
    pr, keep = common.branch_probs(model, tok, args.task, rows, a, b)  # (n, 2)
    out[name] = {"p_commit": round(pr[:, 0].mean().item(), 4) if len(keep) else None,
                 "p_verify": round(pr[:, 1].mean().item(), 4) if len(keep) else None, "n": len(keep)}
    print(f"{name}: P({a}: commit) {out[name]['p_commit']} | P({b}: verify again) {out[name]['p_verify']} | "
          f"{len(keep)} of {len(rows)} rows | {time.time() - t0:.0f}s", flush=True)
    del model
common.atomic_write_json(os.path.join(args.out_dir, "probe.json"), out)
print(f"done -> {args.out_dir}/probe.json")
