//! Tokenizers that a GGUF file describes in its metadata with a
//! SentencePiece vocabulary (`tokenizer.ggml.model = "llama"`: Gemma,
//! Llama 2, Mistral, Phi-3): a byte-fallback BPE whose merges are
//! recovered from the vocabulary as transformers recovers them (Gemma
//! ranks them by the order of the tokens in the file, the others by the
//! tokens' scores), with spaces written as "▁" and a "▁" before the text
//! where the file's `add_space_prefix` says so (as llama.cpp does).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer};

/// Token types of llama.cpp's vocabularies.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// Entries of a GGUF array as integers (token types come as i32 or u32).
fn integers(value: &Value) -> Option<Vec<i64>> {
    let items = value.to_vec().ok()?;
    items
        .iter()
        .map(|v| {
            v.to_i32()
                .map(i64::from)
                .or_else(|_| v.to_u32().map(i64::from))
                .ok()
        })
        .collect()
}

fn floats(value: &Value) -> Option<Vec<f32>> {
    let items = value.to_vec().ok()?;
    items.iter().map(|v| v.to_f32().ok()).collect()
}

/// The merges a SentencePiece vocabulary implies: every split of a token
/// into two tokens of the vocabulary, the token's own rank deciding the
/// order (higher first), then the lengths of the two halves (longer
/// first); the splits of one token in the order of their halves' ids.
/// This is the rule transformers follows (`generate_merges`).
fn merges(tokens: &[String], rank: &[f64]) -> Vec<(String, String)> {
    // Later duplicates overwrite earlier ids, as a Python dict built from
    // the list does, but keep the first one's place in the iteration.
    let mut id: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (i, token) in tokens.iter().enumerate() {
        if id.insert(token, i).is_none() {
            order.push(token);
        }
        score.insert(token, rank[i]);
    }
    let mut all: Vec<(f64, usize, usize, &str, &str)> = Vec::new();
    for token in order {
        let mut local = Vec::new();
        for (cut, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(cut);
            if let (Some(&l), Some(&r)) = (id.get(left), id.get(right)) {
                local.push((l, r, left, right));
            }
        }
        local.sort_by_key(|&(l, r, _, _)| (l, r));
        let s = score[token];
        all.extend(local.into_iter().map(|(_, _, left, right)| {
            (s, left.chars().count(), right.chars().count(), left, right)
        }));
    }
    // A stable sort, largest key first (Python's `sorted(..., reverse=True)`).
    all.sort_by(|a, b| {
        (b.0, b.1, b.2)
            .partial_cmp(&(a.0, a.1, a.2))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    all.into_iter()
        .map(|(_, _, _, l, r)| (l.to_string(), r.to_string()))
        .collect()
}

/// The tokenizer of a GGUF file with a SentencePiece vocabulary, or `Err`
/// naming what its metadata lacks.
pub(crate) fn sentencepiece(content: &Content) -> std::result::Result<Tokenizer, String> {
    let meta = |key: &str| content.metadata.get(key);
    let arch = meta("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .unwrap_or_default();
    let mut tokens: Vec<String> = meta("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .ok_or("the file has no tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| "tokenizer.ggml.tokens holds a value that is not text")?;
    let n = tokens.len();
    let types = meta("tokenizer.ggml.token_type")
        .and_then(integers)
        .filter(|t| t.len() == n)
        .unwrap_or_else(|| vec![1; n]);
    let gemma = arch.starts_with("gemma");
    let rank: Vec<f64> = if gemma {
        // Gemma's scores do not follow its merge order; the file's order does.
        // Tokens of spaces only are stored as spaces but looked up as "▁"s.
        for token in tokens.iter_mut() {
            if token.contains(' ') && token.trim().is_empty() {
                *token = "\u{2581}".repeat(token.chars().count());
            }
        }
        (0..n).map(|i| -(i as f64)).collect()
    } else {
        let scores = meta("tokenizer.ggml.scores")
            .and_then(floats)
            .filter(|s| s.len() == n)
            .ok_or("the file has no tokenizer.ggml.scores for its tokens")?;
        scores.into_iter().map(f64::from).collect()
    };
    let merges = merges(&tokens, &rank);
    let mut vocab: tokenizers::models::bpe::Vocab = Default::default();
    for (i, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), i as u32);
    }
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true);
    if gemma && tokens.iter().any(|t| t == "<unk>") {
        builder = builder.unk_token("<unk>".into());
    }
    let bpe = builder.build().map_err(|e| e.to_string())?;
    let mut tokenizer = Tokenizer::new(bpe);

    let prefix = meta("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let replace = || Replace::new(" ", "\u{2581}").map_err(|e| e.to_string());
    let mut decoders: Vec<DecoderWrapper> = vec![
        tokenizers::decoders::DecoderWrapper::Replace(
            tokenizers::normalizers::replace::Replace::new("\u{2581}", " ")
                .map_err(|e| e.to_string())?,
        ),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    // Spaces become "▁"; a "▁" goes before the text where the file says so
    // (as llama.cpp and SentencePiece add it, and Llama's own tokenizer.json
    // does: a leading space then gives two). Gemma's vocabularies add none.
    if prefix && !gemma {
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::from(NormalizerSequence::new(
                vec![Prepend::new("\u{2581}".into()).into(), replace()?.into()],
            ))))
            .map_err(|e| e.to_string())?;
        decoders.push(Strip::new(' ', 1, 0).into());
    } else {
        tokenizer
            .with_normalizer(Some(NormalizerWrapper::from(replace()?)))
            .map_err(|e| e.to_string())?;
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));

    // Control tokens stay whole and are left out of decoded text;
    // user-defined ones stay whole.
    let pick = |kind: i64| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == kind)
            .map(|(token, _)| AddedToken::from(token.clone(), kind == CONTROL).normalized(false))
            .collect()
    };
    tokenizer
        .add_special_tokens(pick(CONTROL))
        .map_err(|e| e.to_string())?;
    tokenizer
        .add_tokens(pick(USER_DEFINED))
        .map_err(|e| e.to_string())?;

    let id = |key: &str| {
        meta(key)
            .and_then(|v| v.to_u32().ok())
            .filter(|&i| (i as usize) < n)
    };
    let add_bos = meta("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let add_eos = meta("tokenizer.ggml.add_eos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    let mut single = Vec::new();
    let mut specials = Vec::new();
    for (wanted, key) in [
        (add_bos, "tokenizer.ggml.bos_token_id"),
        (add_eos, "tokenizer.ggml.eos_token_id"),
    ] {
        if let (true, Some(i)) = (wanted, id(key)) {
            let token = tokens[i as usize].clone();
            specials.push((token.clone(), i));
            single.push(token);
        }
        if key.contains("bos") {
            single.push("$A".into());
        }
    }
    if !specials.is_empty() {
        let template = TemplateProcessing::builder()
            .try_single(single.join(" "))
            .map_err(|e| e.to_string())?
            .special_tokens(specials)
            .build()
            .map_err(|e| e.to_string())?;
        tokenizer.with_post_processor(Some(template));
    }
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::merges;

    #[test]
    fn merges_follow_rank_then_lengths_then_ids() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc", "cab"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let rank: Vec<f64> = (0..tokens.len()).map(|i| -(i as f64)).collect();
        let got = merges(&tokens, &rank);
        // transformers' generate_merges on the same vocabulary and ranks.
        let want = [
            ("a", "b"),
            ("b", "c"),
            ("ab", "c"),
            ("a", "bc"),
            ("c", "ab"),
        ];
        assert_eq!(
            got,
            want.iter()
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .collect::<Vec<_>>()
        );
    }
}
