#!/usr/bin/env bash
# The one script run on the lent H100 (see README "GPU runs"): builds the extension, checks the SASS, runs
# `pytest -m gpu` and the benchmarks, writing logs under $OUT (default ./gpu-logs).
#   bash scripts/gpu_check.sh [build] [tests] [sanitize] [bench] [bench-quick] [bench-fp8] [bench-fp8-linear]
#   [bench-mla] [engine] [serve] [prefix] [truth] (default: build tests). bench-fp8-linear:
#   benchmarks/bench_fp8_linear.py (dense FP8 linears: our CUDA kernel per tile kind, Triton, cuBLAS bf16;
#   FP8_LINEAR_ARGS). bench-mla: benchmarks/bench_mla.py (MLA decode against its byte floor). serve:
#   benchmarks/bench_serve.py per preset (SERVE_PRESETS, SERVE_ARGS); prefix:
#   benchmarks/bench_prefix_cache.py per preset (SERVE_PRESETS, PREFIX_ARGS); truth: the utilization-metric check
#   (benchmarks/utilization_truth.py, TRUTH_PRESET). decode-ab: the decode step profile with our Triton KV write and
#   router, then with the torch ops (issue 21); metrics-ab: the same profile with and without expert metrics
#   (DECODE_PRESETS, default olmoe-1b-7b qwen3-30b-a3b). api-costs: benchmarks/bench_api_costs.py (API_PRESET,
#   API_ARGS). grammar-masks: benchmarks/bench_grammar_masks.py (structured output's host cost per step).
#   ncu-fp8: Nsight Compute on the FP8 GEMMs of one layer call (NCU_POINT, default qwen3:8192:balanced).
#   piecewise: piecewise graphs of steps that prefill: their GPU tests, then profile_engine prefill on and off.
#   decode-attention: the Triton decode attention's split choice at batch 1-64 against its byte floor (issue 21).
#   decode-moe-sweep: the two-launch decode MoE's launch shapes (BLOCK_I, BLOCK_H, warps) timed for OLMoE and Qwen3.
#   decode-moe: the decode MoE layer (two launches, one launch, CUDA) timed for OLMoE and Qwen3 at T = 1, 4, 8.
#   knob-ab: an opt-in switch (AB_KNOB) checked by AB_TESTS with it on, then OLMoE/Qwen3 engine on/off/on/off.
#   gemv: the 16-bit decode linear (model/kernels/triton_gemv.py): GPU tests, then against cuBLAS at decode shapes.
#   fp8-tile-fit: FP8 GEMM times as K varies (per-step and per-tile cost).
#   ncu-ledger: the FP8 GEMMs' stall samples per SASS line (NCU_POINT).
#   prefill-costs: profile_engine prefill for deepseek-v2-lite and qwen3-30b-a3b (bf16 and FP8) at a budget of 8192.
#   qk-fusion: the fused q/k norm + rotary's GPU tests and the decode kernels per step after it.
#   gemm-ab: the grouped GEMMs of this tree against AB_BASE's csrc/ (per-kernel times at AB_POINTS, ABAB).
#   layer-knob-ab: switches of the extension (AB_KNOB, space-separated): AB_TESTS with each on, then AB_POINTS' kernel
#   times with all off, each on, all on (AB_SETTINGS: another list, `+` joining switches), per pass (AB_PASSES="a b");
#   AB_TESTS_ALL=1 runs AB_TESTS once with every switch on instead of once per switch. A switch written NAME=VALUE is
#   on at VALUE (off: NAME=0), e.g. STATICMOE_CLUSTER_MIN_ROWS=256; settings name it the same way.
#   wgmma-rate: the FP8 mainloop's variants alone, cycles per K step (benchmarks/wgmma_rate.cu; no extension needed).
#   tile-clocks: a probe build's per-tile clock64 stamps of the grouped GEMMs (benchmarks/profile_tile_clocks.py).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests)
if [ -d .whl ]; then  # packages the GPU image lacks, carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -c 'import llguidance' 2>/dev/null || echo "WARNING: llguidance is missing (the engine imports it): carry its wheel in .whl (README, GPU runs)"

{ date -u +%FT%TZ; echo "commit ${STATICMOE_COMMIT:-unknown}"; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader;
  python3 -c 'import torch; print("torch", torch.__version__)'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
run_tests() {  # one process per file: a failed test's traceback must not pin another file's GPU memory
  for f in "$@"; do
    timeout "${TEST_TIMEOUT:-900}" python3 -m pytest -m gpu -q --maxfail=8 -p no:cacheprovider ${PYTEST_ARGS:-} "$f" \
      > "$OUT/pytest_$(basename "$f" .py)${PYTEST_LOG_TAG:-}.log" 2>&1
    rc=$?; status=$((status | (rc == 5 ? 0 : rc)))
    echo "$f: $(tail -1 "$OUT/pytest_$(basename "$f" .py)${PYTEST_LOG_TAG:-}.log")"
    [ $rc -ne 0 ] && [ $rc -ne 5 ] && grep -E "^(FAILED|ERROR)|^E  " "$OUT/pytest_$(basename "$f" .py)${PYTEST_LOG_TAG:-}.log" | head -8
  done
}
knob_on() { [[ $1 == *=* ]] && echo "$1" || echo "$1=1"; }  # a layer-knob-ab switch as NAME=VALUE when on
extension_so() { python3 -c 'from model.kernels import _C; print(_C.__file__)'; }  # the installed extension
by_precision() {  # POINTS CMD...: CMD --fp8 on the points prefixed `fp8:` (prefix dropped), then CMD on the rest
  local -a pts fp8=() b16=(); local p
  read -ra pts <<< "$1"; shift
  for p in "${pts[@]}"; do [[ $p == fp8:* ]] && fp8+=("${p#fp8:}") || b16+=("$p"); done
  [ ${#fp8[@]} -eq 0 ] || "$@" --fp8 "${fp8[@]}"
  [ ${#b16[@]} -eq 0 ] || "$@" "${b16[@]}"
}
for step in "${steps[@]}"; do
  echo "=== $step"
  case $step in
    build)
      python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
      so=$(extension_so)
      cuobjdump --dump-sass "$so" > "$OUT/sass.txt" 2>&1
      echo "HGMMA: $(grep -c HGMMA "$OUT/sass.txt")  QGMMA (fp8): $(grep -c QGMMA "$OUT/sass.txt")  LDL/STL: $(grep -cE '\b(LDL|STL)\b' "$OUT/sass.txt")" ;;
    tests) run_tests ${TESTS:-$(grep -l "pytest.mark.gpu\|pytestmark = pytest.mark.gpu" tests/test_*.py)} ;;
    sanitize)  # a subset per tool: bf16 and FP8 odd shapes (ragged tiles, clusters), the plan
      for tool in memcheck racecheck; do
        sel=("tests/test_kernels_gpu.py::test_odd_shapes_and_dtypes" "tests/test_kernels_gpu.py::test_plan_matches_host_twin_and_counts_load"
             "tests/test_kernels_gpu.py::test_cluster_path_with_odd_and_empty_halves"
             "tests/test_kernels_fp8_gpu.py::test_fp8_odd_shapes" "tests/test_kernels_fp8_gpu.py::test_activation_quantiser_matches_the_torch_rule_bitwise"
             -k "not 8-2-264-136-4096 and not 1024-6-256-128")
        [ $tool = racecheck ] && sel=("tests/test_kernels_gpu.py::test_odd_shapes_and_dtypes"
             "tests/test_kernels_gpu.py::test_cluster_path_with_odd_and_empty_halves"
             "tests/test_kernels_gpu.py::test_plan_matches_host_twin_and_counts_load"
             "tests/test_kernels_fp8_gpu.py::test_fp8_odd_shapes"
             -k "6-6-264-136-97 or 3-1-72-200-1 or (5-3-136-264-1100 and zipf) or plan_matches or 6-6-384-256 or 3-1-128-128 or 5-3-640-384")
        compute-sanitizer --tool $tool --error-exitcode 3 python3 -m pytest -q -p no:cacheprovider -m gpu "${sel[@]}" \
          > "$OUT/sanitize_$tool.log" 2>&1
        echo "compute-sanitizer $tool exit $?: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/sanitize_$tool.log" | tail -2 | tr '\n' ' ')"
      done ;;
    bench) python3 benchmarks/bench_moe.py --out-dir "$OUT" 2>&1 | tee "$OUT/bench_moe.log" | tail -60 ;;
    bench-quick) python3 benchmarks/bench_moe.py --quick --out-dir "$OUT" 2>&1 | tee "$OUT/bench_moe.log" | tail -60 ;;
    bench-fp8) python3 benchmarks/bench_moe_fp8.py ${FP8_ARGS:-} --out-dir "$OUT" 2>&1 | tee "$OUT/bench_moe_fp8.log" | tail -70 ;;
    bench-fp8-linear) python3 benchmarks/bench_fp8_linear.py ${FP8_LINEAR_ARGS:---tile-sweep} --out "$OUT" 2>&1 \
        | tee "$OUT/bench_fp8_linear.log" | tail -50 ;;
    bench-mla) python3 benchmarks/bench_mla.py --batch 1,64 --context 1024,4096 --heads 16,128 \
        --json "$OUT/bench_mla.json" 2>&1 | tee "$OUT/bench_mla.log" | tail -20 ;;
    engine)  # ENGINE_ARGS: one bench_engine.py run, or several separated by ';' (each in its own process)
      IFS=';' read -ra engine_runs <<< "${ENGINE_ARGS:-}"
      [ ${#engine_runs[@]} -eq 0 ] && engine_runs=("")
      for i in "${!engine_runs[@]}"; do
        python3 benchmarks/bench_engine.py ${engine_runs[$i]} --out "$OUT" 2>&1 | tee "$OUT/bench_engine_$i.log" | tail -30
        status=$((status | ${PIPESTATUS[0]}))
      done ;;
    serve)  # one server per preset and process: a first preset's CUDA context would shrink the next one's KV cache;
      # SERVE_ARGS: one set of flags, or several separated by ';' (each run for every preset)
      IFS=';' read -ra serve_runs <<< "${SERVE_ARGS:-}"
      [ ${#serve_runs[@]} -eq 0 ] && serve_runs=("")
      for i in "${!serve_runs[@]}"; do
        for p in ${SERVE_PRESETS:-olmoe-1b-7b qwen3-30b-a3b}; do
          python3 benchmarks/bench_serve.py --presets "$p" ${serve_runs[$i]} --out "$OUT" 2>&1 \
            | tee "$OUT/bench_serve_${p}_$i.log" | tail -40
          status=$((status | ${PIPESTATUS[0]}))
        done
      done ;;
    prefix)  # caching on vs --no-prefix-caching, fresh servers in ABBA order (one process per preset, as serve)
      for p in ${SERVE_PRESETS:-olmoe-1b-7b qwen3-30b-a3b}; do
        python3 benchmarks/bench_prefix_cache.py --presets "$p" ${PREFIX_ARGS:-} --out "$OUT" 2>&1 \
          | tee "$OUT/bench_prefix_cache_$p.log" | tail -40
        status=$((status | ${PIPESTATUS[0]}))
      done ;;
    decode-ab)
      for mode in triton torch; do
        STATICMOE_CACHE_WRITE=$mode STATICMOE_ROUTER=$mode python3 benchmarks/profile_engine.py step-phases \
          ${DECODE_PRESETS:-olmoe-1b-7b qwen3-30b-a3b} > "$OUT/profile_decode_$mode.log" 2>&1
        echo "$mode: $(grep -E '^[a-z0-9.-]+ batch|kernels per engine step' "$OUT/profile_decode_$mode.log" | tr '\n' ' ')"
      done ;;
    metrics-ab)
      for flag in "" --no-expert-metrics; do
        python3 benchmarks/profile_engine.py step-phases $flag ${DECODE_PRESETS:-olmoe-1b-7b qwen3-30b-a3b} \
          > "$OUT/profile_metrics${flag:-_on}.log" 2>&1
        echo "${flag:-metrics on}: $(grep -E '^[a-z0-9.-]+ batch' "$OUT/profile_metrics${flag:-_on}.log" | tr '\n' ' ')"
      done ;;
    api-costs)  # issue 20: logprobs and structured output on vs off at c=64, one server, interleaved levels
      python3 benchmarks/bench_api_costs.py --preset "${API_PRESET:-qwen3-30b-a3b}" --client-processes 4 \
        ${API_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/bench_api_costs.log" | tail -12
      status=$((status | ${PIPESTATUS[0]})) ;;
    grammar-masks)  # issue 20: host cost of structured output per step on this machine's CPUs, our thread count
      # then one thread (per-mask cost), with the tokenizer api-costs trained (trained here if absent, ~1 min)
      dir="$OUT/work/${API_PRESET:-qwen3-30b-a3b}_bpe100000"
      [ -f "$dir/tokenizer.json" ] || python3 -c "import argparse, pathlib; from benchmarks.bench_api_costs import \
model_source; model_source(argparse.Namespace(preset='${API_PRESET:-qwen3-30b-a3b}', vocab=100000), pathlib.Path('$OUT/work'))"
      for threads in 0 1; do
        python3 benchmarks/bench_grammar_masks.py --tokenizer "$dir" --threads $threads \
          --json "$OUT/grammar_masks_threads$threads.json" 2>&1 | tee "$OUT/grammar_masks_threads$threads.log" | tail -3
        status=$((status | ${PIPESTATUS[0]}))
      done ;;
    ncu-fp8)  # issue 16: one FP8 GEMM launch per kernel under Nsight Compute (tensor pipe share, stall reasons)
      for skip in 0 1; do  # launch 0 is GEMM1, launch 1 GEMM2 of the same layer call
        ncu --kernel-name regex:moe_gemm_fp8 --launch-skip $skip --launch-count 1 --set full \
          python3 benchmarks/profile_moe.py once --fp8 "${NCU_POINT:-qwen3:8192:balanced}" > "$OUT/ncu_fp8_gemm$((skip + 1)).txt" 2>&1
        echo "ncu gemm$((skip + 1)): $(grep -E 'Duration|Compute \(SM\) Throughput' "$OUT/ncu_fp8_gemm$((skip + 1)).txt" | tr -s ' ' | tr '\n' ';')"
      done ;;
    ncu-ledger)  # issue 16: per-SASS-line stall samples of FP8 GEMM1 and GEMM2 (scripts/ncu_stall_ledger.py)
      for skip in 0 1; do
        ncu --kernel-name regex:moe_gemm_fp8 --launch-skip $skip --launch-count 1 --section SourceCounters \
          --section WarpStateStats --section SpeedOfLight -f -o /tmp/ledger_gemm$((skip + 1)) \
          python3 benchmarks/profile_moe.py once --fp8 "${NCU_POINT:-qwen3:8192:balanced}" > /tmp/ledger_ncu$skip.log 2>&1
        ncu -i /tmp/ledger_gemm$((skip + 1)).ncu-rep --page source --csv --print-source sass > /tmp/ledger_src$skip.csv 2>&1
        cp /tmp/ledger_src$skip.csv "$OUT/ncu_source_gemm$((skip + 1)).csv"
        python3 scripts/ncu_stall_ledger.py /tmp/ledger_src$skip.csv --max-rows 45 > "$OUT/ncu_ledger_gemm$((skip + 1)).txt" 2>&1
        ncu -i /tmp/ledger_gemm$((skip + 1)).ncu-rep --page details >> "$OUT/ncu_ledger_gemm$((skip + 1)).txt" 2>&1
        echo "gemm$((skip + 1)): $(head -1 "$OUT/ncu_ledger_gemm$((skip + 1)).txt" | cut -c1-80)"; sed -n 2,9p "$OUT/ncu_ledger_gemm$((skip + 1)).txt" | cut -c1-150
      done ;;
    fp8-tile-fit)  # issue 16: FP8 per-kernel times as K varies at a fixed tile count, for t = steps x s + c per GEMM
      python3 benchmarks/profile_moe.py points --fp8 e128k8h2048i384:8192:balanced e128k8h2048i768:8192:balanced \
        e128k8h2048i1536:8192:balanced e128k8h2048i3072:8192:balanced e128k8h1024i768:8192:balanced \
        e128k8h4096i768:8192:balanced e128k8h8192i768:8192:balanced > "$OUT/fp8_tile_fit.txt" 2>&1
      python3 benchmarks/profile_moe.py points e128k8h2048i384:8192:balanced e128k8h2048i768:8192:balanced \
        e128k8h2048i1536:8192:balanced e128k8h2048i3072:8192:balanced >> "$OUT/fp8_tile_fit.txt" 2>&1
      grep -vE '^\s*$' "$OUT/fp8_tile_fit.txt" | tail -40 ;;
    piecewise)  # issue 22/20: piecewise graphs of steps that prefill: tests, then prefill and mixed steps on / off
      run_tests tests/test_piecewise_graphs.py tests/test_moe_timing.py
      run_tests tests/test_engine_graphs.py tests/test_engine_prefix_cache.py  # pieces are on by default
      for flag in "" --no-piecewise-graphs; do
        python3 benchmarks/profile_engine.py prefill ${PIECEWISE_PRESETS:-olmoe-1b-7b} --budget 2048 8192 $flag \
          > "$OUT/profile_prefill${flag:-_piecewise}.log" 2>&1
        echo "prefill/mixed ${flag:-piecewise}: $(grep -E 'chunk budget|prefill: |total wall' "$OUT/profile_prefill${flag:-_piecewise}.log" | tr '\n' ' ')"
      done ;;
    decode-attention)  # issue 21 item 3: the Triton decode attention's splits at small batches vs its byte floor
      python3 benchmarks/bench_decode_attention.py 2>&1 | tee "$OUT/bench_decode_attention.log" | tail -40 ;;
    gemv)  # issue 21: o_proj/qkv at batch 1 ran ~4.5 µs a layer over their floor in cuBLAS (split-K + reduce)
      run_tests tests/test_triton_gemv_gpu.py
      PYTHONPATH=. python3 benchmarks/bench_gemv.py 2>&1 | tee "$OUT/bench_gemv.log" | grep -E "M=(1|16) " ;;
    decode-moe-sweep)  # issue 21: which launch shapes stream the small experts fastest at T = 1 and 4
      PYTHONPATH=. python3 benchmarks/bench_decode_moe.py --shapes qwen3-30b-a3b,olmoe-1b-7b --tokens 1,4 --sweep \
        2>&1 | tee "$OUT/bench_decode_moe_sweep.log" | grep -E "two-launch|sweep:" ;;
    decode-moe)  # issue 21: the layer at its default launch shapes against the byte floor and the CUDA path
      PYTHONPATH=. python3 benchmarks/bench_decode_moe.py --shapes qwen3-30b-a3b,olmoe-1b-7b --tokens 1,4,8 \
        2>&1 | tee "$OUT/bench_decode_moe.log" | grep -E "two-launch" ;;
    prefill-costs)  # issues 23/19: where prefill time goes (deepseek-v2-lite's b64 prefill took ~3x its FLOPs' time;
      # Qwen3's FP8 TTFT above bf16's): 64 x 512-token prompts at a budget of 8192, kernel table and host profile
      # (and its one-prompt prefill: ~100 ms more than gpt-oss-20b's at batch 1)
      for spec in "deepseek-v2-lite none 64" "deepseek-v2-lite none 1" "qwen3-30b-a3b none 64" "qwen3-30b-a3b fp8 64"; do
        read -r preset quant batch <<< "$spec"
        log="$OUT/profile_prefill_${preset}_${quant}_b${batch}.log"
        python3 benchmarks/profile_engine.py prefill "$preset" --budget 8192 --quantization "$quant" --batch "$batch" \
          > "$log" 2>&1
        rc=$?; status=$((status | rc)); [ $rc -ne 0 ] && echo "$preset $quant b$batch: FAILED (rc $rc)"
        echo "$preset $quant b$batch: $(grep -E 'prefill: |total wall|specialised a kernel' "$log" | tr '\n' ' ')"
      done ;;
    qk-fusion)  # issue 21: q/k norm + rotary fused (model/layers/qk_norm_rotary.py): its GPU test, then kernels per
      # decode step (before: olmoe b1 300, qwen3 b1 950; gpu_runs.md 2026-12-06 20:16/20:33)
      run_tests tests/test_qk_norm_rotary.py tests/test_fusion.py
      # gpt-oss-20b (no q/k norm) for its decode kernel table (issue 24: batch 1 at 1.57x its floor on the H100)
      python3 benchmarks/profile_engine.py step-phases olmoe-1b-7b qwen3-30b-a3b gpt-oss-20b \
        > "$OUT/profile_decode_qk_fusion.log" 2>&1
      rc=$?; status=$((status | rc)); [ $rc -ne 0 ] && echo "step-phases: FAILED (rc $rc)"
      grep -E '^[a-z0-9.-]+ batch|kernels per engine step' "$OUT/profile_decode_qk_fusion.log" ;;
    knob-ab)  # an opt-in switch AB_KNOB (e.g. STATICMOE_PDL, STATICMOE_NORM_ROTARY_WRITE) checked and timed: the GPU
      # test files AB_TESTS with it on, then bench_engine for AB_PRESETS at batch 1 and 64 with it on, off, on, off
      [ -n "${AB_KNOB:-}" ] || { echo "knob-ab needs AB_KNOB"; exit 2; }
      if [ -n "${AB_TESTS:-}" ]; then export "$AB_KNOB=1"; run_tests $AB_TESTS; unset "$AB_KNOB"; fi
      for pass in 1a 0a 1b 0b; do
        dir="$OUT/${AB_KNOB}_$pass"; mkdir -p "$dir"
        env "$AB_KNOB=${pass:0:1}" python3 benchmarks/bench_engine.py --presets ${AB_PRESETS:-olmoe-1b-7b qwen3-30b-a3b} \
          --batches 1 64 --skip-hf --out "$dir" > "$dir.log" 2>&1
        rc=$?; status=$((status | rc)); [ $rc -ne 0 ] && echo "$AB_KNOB pass $pass: FAILED (rc $rc)"
        echo "$AB_KNOB pass $pass: $(grep -E '^SUMMARY' "$dir.log" | tr '\n' ' ')"
      done ;;
    gemm-ab)  # the grouped-GEMM kernels of this tree against another tree's csrc/ (AB_BASE, default .ab_base/csrc,
      # made here with `git archive BASE csrc | tar -x -C .ab_base` and carried): both built once, then the per-kernel
      # times of AB_POINTS (profile_moe.py; FP8 points prefixed `fp8:`) in new, base, new, base order
      base=${AB_BASE:-.ab_base/csrc}; [ -d "$base" ] || { echo "gemm-ab: no $base"; status=1; continue; }
      so=$(extension_so); cp "$so" /tmp/_C_new.so
      mv csrc /tmp/csrc_new && cp -r "$base" csrc
      python3 -m pip install --no-build-isolation --no-deps -e . -C build-dir=build/ab_base > "$OUT/build_ab_base.log" 2>&1
      rc=$?; rm -rf csrc && mv /tmp/csrc_new csrc
      [ $rc -ne 0 ] && { tail -20 "$OUT/build_ab_base.log"; status=1; continue; }
      so=$(extension_so); cp "$so" /tmp/_C_base.so
      for pass in new base new base; do
        cp /tmp/_C_$pass.so "$so"
        by_precision "${AB_POINTS:-fp8:qwen3:8192:balanced fp8:qwen3:2048:balanced qwen3:8192:balanced}" \
          python3 benchmarks/profile_moe.py points > "$OUT/gemm_ab_$pass.log" 2>&1
        echo "gemm-ab $pass:"; grep -E "ms .* TFLOPS" "$OUT/gemm_ab_$pass.log" | sed 's/^\[[^]]*\] //' | cut -c1-150
      done
      cp /tmp/_C_new.so "$so" ;;
    tile-clocks)  # issue 16: where a GEMM tile's cycles go (csrc/common/tile_clocks.cuh): a probe build beside the
      # normal one, benchmarks/profile_tile_clocks.py at CLOCK_POINTS (FP8 points prefixed `fp8:`), the normal .so back
      cp "$(extension_so)" /tmp/_C_normal.so
      python3 -m pip install --no-build-isolation --no-deps -e . -C build-dir=build/probe \
        -C cmake.define.STATICMOE_EXTRA_NVCC_FLAGS=-DSTATICMOE_TILE_CLOCKS > "$OUT/build_probe.log" 2>&1 \
        || { tail -20 "$OUT/build_probe.log"; status=1; continue; }
      by_precision "${CLOCK_POINTS:-fp8:qwen3:8192:balanced fp8:mixtral:8192:balanced qwen3:8192:balanced}" \
        python3 benchmarks/profile_tile_clocks.py 2>&1 | grep -v "Warn\|_warn_once" | tee "$OUT/tile_clocks.log"
      cp /tmp/_C_normal.so "$(extension_so)" ;;  # the probe's install path: later steps run the normal kernels
    wgmma-rate)  # issue 16: what bounds the FP8 mainloop (promotion, shared-memory traffic, instruction shape)
      { nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -std=c++17 -I csrc benchmarks/wgmma_rate.cu -o /tmp/wgmma_rate \
          && /tmp/wgmma_rate; } 2>&1 | tee "$OUT/wgmma_rate.log"
      status=$((status | PIPESTATUS[0])) ;;
    layer-knob-ab)  # 0/1 kernel switches AB_KNOB (one, or several separated by spaces) read by the extension: the GPU
      # test files AB_TESTS with each switch on, then the layer's per-kernel times at AB_POINTS (as gemm-ab) with all
      # off, each on alone and (several) all on, that sequence twice
      [ -n "${AB_KNOB:-}" ] || { echo "layer-knob-ab needs AB_KNOB"; exit 2; }
      read -ra knobs <<< "$AB_KNOB"
      if [ -n "${AB_TESTS:-}" ] && [ "${AB_TESTS_ALL:-0}" = 1 ]; then  # once, every switch on together
        echo "tests with ${knobs[*]} on:"
        for knob in "${knobs[@]}"; do export "$(knob_on "$knob")"; done
        PYTEST_LOG_TAG=_all run_tests $AB_TESTS
        for knob in "${knobs[@]}"; do unset "${knob%%=*}"; done
      elif [ -n "${AB_TESTS:-}" ]; then
        for knob in "${knobs[@]}"; do
          echo "tests with $(knob_on "$knob"):"
          export "$(knob_on "$knob")" PYTEST_LOG_TAG="_${knob//=/_}"; run_tests $AB_TESTS; unset "${knob%%=*}" PYTEST_LOG_TAG
        done
      fi
      settings=("none" "${knobs[@]}"); [ ${#knobs[@]} -gt 1 ] && settings+=("all")
      [ -n "${AB_SETTINGS:-}" ] && read -ra settings <<< "$AB_SETTINGS"  # e.g. "none A B A+B none"
      for pass in ${AB_PASSES:-a b}; do
        i=0
        for setting in "${settings[@]}"; do
          env_on=(); env_off=(); for knob in "${knobs[@]}"; do  # offs first: a variable listed twice ends on
            [[ $setting == all || +$setting+ == *"+$knob+"* ]] && env_on+=("$(knob_on "$knob")") || env_off+=("${knob%%=*}=0"); done
          tag=${setting//STATICMOE_/}; tag=${tag//=/_}; log="$OUT/layer_knob_$((i++))_${tag//+/-}_$pass.log"
          by_precision "${AB_POINTS:-fp8:qwen3:8192:balanced fp8:qwen3:2048:balanced}" \
            env "${env_off[@]}" "${env_on[@]}" python3 benchmarks/profile_moe.py points > "$log" 2>&1
          echo "$setting ($pass):"; grep -E "ms .* TFLOPS" "$log" | sed 's/^\[[^]]*\] //' | cut -c1-150
        done
      done ;;
    truth)
      python3 benchmarks/utilization_truth.py --preset "${TRUTH_PRESET:-olmoe-1b-7b}" --out "$OUT" 2>&1 \
        | tee "$OUT/utilization_truth.log" | tail -20
      status=$((status | ${PIPESTATUS[0]})) ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
# The lent machine returns at most 8 files from $OUT: everything also goes back packed in one archive, named to sort
# first (server logs, pytest logs, SASS)
tar czf /tmp/gpu_logs.tgz -C "$OUT" --exclude=0_all_logs.tgz . && mv /tmp/gpu_logs.tgz "$OUT/0_all_logs.tgz"
exit $status
