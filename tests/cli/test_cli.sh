#!/usr/bin/env bash
# test_cli.sh - the command-line contract: kestrel tokenize / embed / score against the reference
# outputs in tests/fixtures/models/*/kestrel_ref, exit codes and messages on bad input.
set -u
. tests/cli/lib.bash
B=$(dirname "$K")
CLOSE="$B/tests/tools/npy_close"
F=tests/fixtures/models


# --- tokenize: the ids transformers / colbert-ai produced
check "tokenize dense texts" diff <("$K" tokenize --model $F/st_bert_mean < $F/st_bert_mean/kestrel_ref/texts.txt) $F/st_bert_mean/kestrel_ref/ids.txt
check "tokenize tokenizer.json-only model" diff <("$K" tokenize --model $F/st_bert_sqrtlen_tokjson < $F/st_bert_sqrtlen_tokjson/kestrel_ref/texts.txt) $F/st_bert_sqrtlen_tokjson/kestrel_ref/ids.txt
check "tokenize --pair (cross, longest_first)" diff <("$K" tokenize --model $F/cross_bert --pair < $F/cross_bert/kestrel_ref/pairs.tsv) $F/cross_bert/kestrel_ref/pair_ids.txt
check "tokenize --query (ColBERT marker + [MASK] padding)" diff <("$K" tokenize --model $F/colbert --query < $F/colbert/kestrel_ref/queries.txt) $F/colbert/kestrel_ref/query_ids.txt
check "tokenize ColBERT documents" diff <("$K" tokenize --model $F/colbert < $F/colbert/kestrel_ref/texts.txt) $F/colbert/kestrel_ref/doc_ids.txt

# --- embed: dense .npy and ColBERT vectors + offsets
for m in st_bert_mean st_bert_cls_dense st_distilbert_max st_bert_sqrtlen_tokjson bare_bert; do
  check "embed $m" sh -c "'$K' embed --model $F/$m --batch-size 3 --out $T/$m.npy < $F/$m/kestrel_ref/texts.txt && '$CLOSE' $T/$m.npy $F/$m/kestrel_ref/emb.npy 1e-4 0"
done
check "embed ColBERT documents" sh -c "'$K' embed --model $F/colbert --batch-size 4 --out $T/cb.npy < $F/colbert/kestrel_ref/texts.txt && '$CLOSE' $T/cb.npy $F/colbert/kestrel_ref/doc_emb.npy 1e-4 0 && '$CLOSE' $T/cb.offsets.npy $F/colbert/kestrel_ref/doc_offsets.npy 0 0"
check "embed ColBERT queries ([MASK]-padded)" sh -c "'$K' embed --model $F/colbert --query --out $T/cq.npy < $F/colbert/kestrel_ref/queries.txt && '$CLOSE' $T/cq.npy $F/colbert/kestrel_ref/query_emb.npy 1e-4 0"
check "embed of empty input writes a [0, dim] array" sh -c "'$K' embed --model $F/st_bert_mean --out $T/empty.npy < /dev/null && head -c 128 $T/empty.npy | grep -q \"'shape': (0, 16)\""
check "embed accepts invalid UTF-8 and NUL-free binary" sh -c "printf 'ok \\377\\376 caf\\303 \\xe2\\x82\\n\\t\\ttabs\\n' | '$K' embed --model $F/st_bert_mean --out $T/bin.npy && head -c 128 $T/bin.npy | grep -q \"(2, 16)\""

# --- score: one line per pair, every role
for m in st_bert_mean st_bert_cls_dense cross_bert cross_distilbert colbert; do
  check "score $m" sh -c "'$K' score --model $F/$m --pairs $F/$m/kestrel_ref/pairs.tsv > $T/$m.scores && '$CLOSE' $T/$m.scores $F/$m/kestrel_ref/scores.npy 1e-5 1e-4"
done

# --- help, usage errors and bad input: stable exit codes, messages that say what to do
for c in tokenize embed score; do
  check "$c --help" sh -c "'$K' $c --help | grep -q usage"
done
check "kestrel --help lists commands" sh -c "'$K' --help | grep -q embed"
expect_exit "unknown command" 64 "unknown command" -- "$K" frobnicate
expect_exit "embed without --out" 64 "--out FILE.npy is required" -- "$K" embed --model $F/st_bert_mean
expect_exit "tokenize without --model" 64 "--model DIR is required" -- "$K" tokenize
expect_exit "bad --max-len" 64 "non-negative integer" -- "$K" tokenize --model $F/st_bert_mean --max-len abc
expect_exit "bad --kind" 64 "dense, colbert or cross" -- "$K" tokenize --model $F/st_bert_mean --kind sparse
expect_exit "missing model folder" 5 "no/such/model" -- "$K" embed --model $T/no/such/model --out $T/x.npy
printf 'no tab here\n' > $T/notab.tsv
expect_exit "pairs line without a tab" 3 "notab.tsv line 1: expected query<TAB>passage" -- "$K" score --model $F/cross_bert --pairs $T/notab.tsv
expect_exit "pairs file missing" 2 "nope.tsv" -- "$K" score --model $F/cross_bert --pairs $T/nope.tsv
expect_exit "embed with a cross-encoder" 8 "cross-encoder" -- "$K" embed --model $F/cross_bert --out $T/x.npy
expect_exit "vocabulary larger than vocab_size" 7 "vocab_size is 128" -- sh -c "mkdir -p $T/ws && cp $F/bad/wrong_shape/* $T/ws/ && cp $F/bare_bert/vocab.txt $F/bare_bert/tokenizer_config.json $T/ws/ && '$K' embed --model $T/ws --out $T/x.npy < /dev/null"
expect_exit "broken checkpoint names the tensor" 7 "encoder.layer.0.attention.self.query.weight" -- sh -c "mkdir -p $T/ws2 && cp $F/bad/wrong_shape/* $T/ws2/ && head -128 $F/bare_bert/vocab.txt > $T/ws2/vocab.txt && '$K' embed --model $T/ws2 --out $T/x.npy < /dev/null"
check "a failed embed leaves no output file" sh -c "! ls $T/x.npy $T/x.npy.tmp.* 2>/dev/null | grep -q ."
mkdir -p $T/ro && chmod 500 $T/ro
if [ "$(id -u)" != 0 ]; then
  expect_exit "unwritable output folder" 2 "cannot create" -- sh -c "echo hi | '$K' embed --model $F/st_bert_mean --out $T/ro/x.npy"
fi

# --- broken model folders: each file named in the message, nothing computed
brk() { rm -rf "$T/brk" && cp -r $F/st_bert_mean "$T/brk" && rm -rf "$T/brk/kestrel_ref"; }
brk; echo '[{"idx": 0' > $T/brk/modules.json
expect_exit "corrupt modules.json" 3 "modules.json: invalid JSON at line 1" -- sh -c "echo x | '$K' embed --model $T/brk --out $T/x.npy"
brk; echo '{"pooling_mode": "weighted"}' > $T/brk/1_Pooling/config.json
expect_exit "unknown pooling mode" 6 "pooling_mode \"weighted\"" -- sh -c "echo x | '$K' embed --model $T/brk --out $T/x.npy"
brk; echo '{"pooling_mode_cls_token": "yes"}' > $T/brk/1_Pooling/config.json
expect_exit "pooling flag of the wrong type" 3 "\"pooling_mode_cls_token\" must be true or false" -- sh -c "echo x | '$K' embed --model $T/brk --out $T/x.npy"
brk; rm $T/brk/model.safetensors
expect_exit "no weights" 5 "no model.safetensors" -- sh -c "echo x | '$K' embed --model $T/brk --out $T/x.npy"
brk; rm $T/brk/vocab.txt $T/brk/tokenizer.json
expect_exit "no vocabulary" 5 "vocab.txt" -- sh -c "echo x | '$K' embed --model $T/brk --out $T/x.npy"
brk; sed -i 's/"model_type": "bert"/"model_type": "roberta"/' $T/brk/config.json
expect_exit "unsupported architecture" 6 "model_type \"roberta\"" -- sh -c "echo x | '$K' embed --model $T/brk --out $T/x.npy"
rm -rf "$T/cbk" && cp -r $F/colbert "$T/cbk" && echo '{"query_maxlen": "32"}' > $T/cbk/artifact.metadata
expect_exit "artifact.metadata field of the wrong type" 3 "artifact.metadata: \"query_maxlen\" must be an integer" -- sh -c "echo x | '$K' embed --model $T/cbk --out $T/x.npy"
head -c 100 $F/st_bert_mean/kestrel_ref/emb.npy > $T/trunc.npy
expect_exit "a truncated .npy is reported" 2 "exceeds file" -- "$CLOSE" $T/trunc.npy $F/st_bert_mean/kestrel_ref/emb.npy 0 0

summary "cli"
