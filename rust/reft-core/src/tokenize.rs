//! Batch tokenization for dataset preprocessing.
//!
//! [`BatchTokenizer`] wraps a Hugging Face `tokenizers` tokenizer and encodes
//! whole datasets on rayon's pool into one flat token array with offsets.
//! Its ids are always the tokenizer's own: for byte-level BPE tokenizers
//! with GPT-2 pre-tokenization (GPT-2, SmolLM, StarCoder and their kin) an
//! ASCII text takes a fast path that gives the same ids as
//! `Tokenizer::encode` at a fraction of the cost:
//!
//! 1. added tokens (`<|im_start|>`, ...) are cut out first, leftmost-longest,
//!    the unnormalized ones before the normalized ones, as the tokenizer does;
//! 2. the rest is split by a scanner equal to the GPT-2 pattern
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!    on ASCII (after the `Digits` split when the tokenizer has one);
//! 3. each piece is mapped to byte-level characters and given to the
//!    tokenizer's model once per thread, its ids kept in a cache.
//!
//! Every other text (non-ASCII, or a tokenizer of another kind) goes through
//! `Tokenizer::encode`, so the fast path changes speed, never ids.

use std::path::Path;

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde_json::Value;
use tokenizers::{Model, Tokenizer};

use crate::error::{Error, Result};
use crate::parallel::parallelism_available;

/// The text around each prompt and response, e.g. a chat template's turn
/// markers: the prompt is encoded as `prompt_before + prompt + prompt_after`.
#[derive(Clone, Debug, Default)]
pub struct PairFormat {
    /// Text before each prompt.
    pub prompt_before: String,
    /// Text after each prompt (e.g. the opening of the assistant's turn).
    pub prompt_after: String,
    /// Text before each response.
    pub response_before: String,
    /// Text after each response (e.g. the end-of-turn marker).
    pub response_after: String,
    /// Whether the prompt gets the tokens the post-processor adds (BOS ...).
    pub prompt_special_tokens: bool,
}

/// A tokenized dataset: example `i` is `tokens[offsets[i]..offsets[i + 1]]`,
/// its first `prompt_lengths[i]` tokens the prompt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EncodedPairs {
    /// Every example's tokens, one after another.
    pub tokens: Vec<u32>,
    /// Where each example starts, and the end: `examples + 1` entries.
    pub offsets: Vec<i64>,
    /// Prompt tokens per example.
    pub prompt_lengths: Vec<i64>,
}

/// A tokenizer that encodes many texts at once (see the module docs).
pub struct BatchTokenizer {
    tokenizer: Tokenizer,
    fast: Option<FastPath>,
}

/// What the fast path needs to know about the tokenizer.
struct FastPath {
    /// `Some(individual)` when a `Digits` pre-tokenizer runs first.
    digits: Option<bool>,
    /// Added tokens matched on the raw text.
    raw_tokens: AddedTokens,
    /// Added tokens matched after normalization (none here).
    normalized_tokens: AddedTokens,
    /// Ids the post-processor puts before and after a text, when it is
    /// one of the kinds that only add tokens.
    special: Option<(Vec<u32>, Vec<u32>)>,
    /// The byte-level alphabet: byte `b` is written as `byte_chars[b]`.
    byte_chars: [char; 256],
}

type Cache = FxHashMap<Box<[u8]>, Box<[u32]>>;

/// Added tokens (content, id), longest first, and which bytes start one.
struct AddedTokens {
    tokens: Vec<(Box<[u8]>, u32)>,
    first: [bool; 256],
}

impl AddedTokens {
    fn new(mut tokens: Vec<(Box<[u8]>, u32)>) -> Self {
        tokens.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        let mut first = [false; 256];
        for (content, _) in &tokens {
            first[content[0] as usize] = true;
        }
        AddedTokens { tokens, first }
    }
}

fn tokenizer_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

/// `work` with a panic inside the `tokenizers` crate (it panics on some
/// damaged `tokenizer.json` files, e.g. an unknown decoder) turned into a
/// [`Error::Tokenizer`] saying what was being done.
pub(crate) fn guarded<T>(what: &str, work: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Error::Tokenizer(format!(
            "the tokenizer failed while {what} (the file is damaged or of a kind the tokenizers library cannot read): {message}"
        ))
    })
}

/// GPT-2's map from bytes to printable characters.
fn byte_chars() -> [char; 256] {
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for (byte, slot) in chars.iter_mut().enumerate() {
        let b = byte as u32;
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        *slot = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    chars
}

fn is_byte_level(value: &Value) -> bool {
    value.get("type").and_then(Value::as_str) == Some("ByteLevel")
        && value.get("add_prefix_space").and_then(Value::as_bool) == Some(false)
        && value
            .get("use_regex")
            .and_then(Value::as_bool)
            .unwrap_or(true)
}

/// No normalizer, or an empty sequence of them.
fn is_no_op_normalizer(value: &Value) -> bool {
    value.is_null()
        || (value.get("type").and_then(Value::as_str) == Some("Sequence")
            && value
                .get("normalizers")
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty))
}

/// `Some(digits)` when the pre-tokenizer is one the fast path reproduces.
fn fast_pre_tokenizer(value: &Value) -> Option<Option<bool>> {
    if is_byte_level(value) {
        return Some(None);
    }
    if value.get("type").and_then(Value::as_str) != Some("Sequence") {
        return None;
    }
    match value
        .get("pretokenizers")
        .and_then(Value::as_array)?
        .as_slice()
    {
        [digits, byte_level]
            if digits.get("type").and_then(Value::as_str) == Some("Digits")
                && is_byte_level(byte_level) =>
        {
            Some(Some(
                digits
                    .get("individual_digits")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            ))
        }
        _ => None,
    }
}

/// The ids the post-processor adds around a text, when it only adds ids.
fn special_affixes(tokenizer: &Tokenizer, config: &Value) -> Option<(Vec<u32>, Vec<u32>)> {
    let kind = match config.get("post_processor") {
        None | Some(Value::Null) => return Some((Vec::new(), Vec::new())),
        Some(post) => post.get("type").and_then(Value::as_str)?,
    };
    if !matches!(
        kind,
        "TemplateProcessing" | "ByteLevel" | "RobertaProcessing" | "BertProcessing"
    ) {
        return None;
    }
    let mut found: Option<(Vec<u32>, Vec<u32>)> = None;
    for probe in ["a", "b c 1", "x"] {
        let encode = |special| {
            guarded("probing the post-processor", || {
                tokenizer.encode(probe, special)
            })
        };
        let with = encode(true).ok()?.ok()?.get_ids().to_vec();
        let without = encode(false).ok()?.ok()?.get_ids().to_vec();
        let start = (0..=with.len().checked_sub(without.len())?)
            .find(|&s| with[s..s + without.len()] == without[..])?;
        let affixes = (
            with[..start].to_vec(),
            with[start + without.len()..].to_vec(),
        );
        match &found {
            Some(previous) if *previous != affixes => return None,
            _ => found = Some(affixes),
        }
    }
    found
}

impl FastPath {
    fn detect(tokenizer: &Tokenizer, config: &Value) -> Option<FastPath> {
        if !config.get("normalizer").is_none_or(is_no_op_normalizer) {
            return None;
        }
        let digits = fast_pre_tokenizer(config.get("pre_tokenizer")?)?;
        let model = config.get("model")?;
        if model.get("type").and_then(Value::as_str) == Some("BPE")
            && model
                .get("dropout")
                .and_then(Value::as_f64)
                .is_some_and(|d| d > 0.0)
        {
            return None;
        }
        if tokenizer.get_encode_special_tokens() {
            return None;
        }
        let mut raw_tokens: Vec<(Box<[u8]>, u32)> = Vec::new();
        let mut normalized_tokens: Vec<(Box<[u8]>, u32)> = Vec::new();
        for (id, token) in tokenizer.get_added_tokens_decoder() {
            if token.lstrip || token.rstrip || token.single_word {
                return None;
            }
            if token.content.is_empty() || !token.content.is_ascii() {
                continue; // never found in ASCII text
            }
            let entry = (token.content.as_bytes().into(), id);
            if token.normalized {
                normalized_tokens.push(entry);
            } else {
                raw_tokens.push(entry);
            }
        }
        Some(FastPath {
            digits,
            raw_tokens: AddedTokens::new(raw_tokens),
            normalized_tokens: AddedTokens::new(normalized_tokens),
            special: special_affixes(tokenizer, config),
            byte_chars: byte_chars(),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

fn class(b: u8) -> Class {
    match b {
        b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
        b'0'..=b'9' => Class::Number,
        b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r' => Class::Space,
        _ => Class::Other,
    }
}

/// Splits ASCII text as the GPT-2 pattern does.
fn split_gpt2(s: &[u8], emit: &mut impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
    let n = s.len();
    let mut i = 0;
    while i < n {
        if s[i] == b'\'' {
            let rest = &s[i + 1..];
            let len =
                if rest.starts_with(b"re") || rest.starts_with(b"ve") || rest.starts_with(b"ll") {
                    3
                } else if matches!(rest.first(), Some(b's' | b't' | b'm' | b'd')) {
                    2
                } else {
                    0
                };
            if len > 0 {
                emit(&s[i..i + len])?;
                i += len;
                continue;
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: a run of one class,
        // with the space before it.
        let start = if s[i] == b' ' && i + 1 < n && class(s[i + 1]) != Class::Space {
            i + 1
        } else {
            i
        };
        let kind = class(s[start]);
        let mut j = start + 1;
        if kind != Class::Space {
            while j < n && class(s[j]) == kind {
                j += 1;
            }
            emit(&s[i..j])?;
            i = j;
            continue;
        }
        // `\s+(?!\S)`: a run of spaces up to the end or all but its last;
        // `\s+`: a single space before a non-space.
        while j < n && class(s[j]) == Class::Space {
            j += 1;
        }
        let end = if j == n || j - i == 1 { j } else { j - 1 };
        emit(&s[i..end])?;
        i = end;
    }
    Ok(())
}

/// Leftmost-longest matches of `tokens` in `text`: calls `on_text` for the
/// text between matches and `on_token` for each match.
fn split_added(
    text: &[u8],
    added: &AddedTokens,
    on_text: &mut impl FnMut(&[u8]) -> Result<()>,
    on_token: &mut impl FnMut(u32),
) -> Result<()> {
    if added.tokens.is_empty() {
        return on_text(text);
    }
    let (mut start, mut i) = (0, 0);
    while i < text.len() {
        if added.first[text[i] as usize] {
            if let Some((content, id)) = added.tokens.iter().find(|(c, _)| text[i..].starts_with(c))
            {
                if start < i {
                    on_text(&text[start..i])?;
                }
                on_token(*id);
                i += content.len();
                start = i;
                continue;
            }
        }
        i += 1;
    }
    if start < text.len() {
        on_text(&text[start..])?;
    }
    Ok(())
}

impl BatchTokenizer {
    /// A tokenizer from the text of a `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Self> {
        let config: Value =
            serde_json::from_str(json).map_err(|e| tokenizer_error("not a tokenizer.json", e))?;
        let mut tokenizer: Tokenizer = guarded("reading tokenizer.json", || json.parse())?
            .map_err(|e| tokenizer_error("cannot read the tokenizer", e))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(None)
            .map_err(|e| tokenizer_error("cannot turn truncation off", e))?;
        let fast = FastPath::detect(&tokenizer, &config);
        Ok(BatchTokenizer { tokenizer, fast })
    }

    /// A tokenizer from a `tokenizer.json` file or a model folder holding one.
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let json = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json(&json)
    }

    /// Whether ASCII texts take the fast path.
    pub fn has_fast_path(&self) -> bool {
        self.fast.is_some()
    }

    /// The wrapped tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Appends the ids of `text` to `out`.
    fn encode_into(
        &self,
        text: &str,
        special: bool,
        cache: &mut Cache,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        let fast = match &self.fast {
            Some(fast) if text.is_ascii() && (!special || fast.special.is_some()) => fast,
            _ => {
                let encoding = guarded("encoding text", || self.tokenizer.encode(text, special))?
                    .map_err(|e| tokenizer_error("cannot encode text", e))?;
                out.extend_from_slice(encoding.get_ids());
                return Ok(());
            }
        };
        let (before, after) = match (&fast.special, special) {
            (Some((before, after)), true) => (before.as_slice(), after.as_slice()),
            _ => (&[][..], &[][..]),
        };
        out.extend_from_slice(before);
        let mut mapped = String::new();
        let mut piece = |piece: &[u8], out: &mut Vec<u32>| -> Result<()> {
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                return Ok(());
            }
            mapped.clear();
            mapped.extend(piece.iter().map(|&b| fast.byte_chars[b as usize]));
            let tokens = guarded("encoding text", || {
                self.tokenizer.get_model().tokenize(&mapped)
            })?
            .map_err(|e| tokenizer_error("cannot encode text", e))?;
            let ids: Box<[u32]> = tokens.iter().map(|t| t.id).collect();
            out.extend_from_slice(&ids);
            cache.insert(piece.into(), ids);
            Ok(())
        };
        let out_cell = std::cell::RefCell::new(out);
        let mut words = |segment: &[u8]| -> Result<()> {
            let mut emit = |p: &[u8]| piece(p, &mut out_cell.borrow_mut());
            match fast.digits {
                None => split_gpt2(segment, &mut emit),
                Some(individual) => {
                    let mut i = 0;
                    while i < segment.len() {
                        let digit = segment[i].is_ascii_digit();
                        let mut j = i + 1;
                        while j < segment.len() && segment[j].is_ascii_digit() == digit {
                            j += 1;
                        }
                        if digit && individual {
                            for k in i..j {
                                emit(&segment[k..k + 1])?;
                            }
                        } else {
                            split_gpt2(&segment[i..j], &mut emit)?;
                        }
                        i = j;
                    }
                    Ok(())
                }
            }
        };
        let mut normalized_pass = |segment: &[u8]| -> Result<()> {
            split_added(segment, &fast.normalized_tokens, &mut words, &mut |id| {
                out_cell.borrow_mut().push(id)
            })
        };
        split_added(
            text.as_bytes(),
            &fast.raw_tokens,
            &mut normalized_pass,
            &mut |id| out_cell.borrow_mut().push(id),
        )?;
        out_cell.into_inner().extend_from_slice(after);
        Ok(())
    }

    /// Runs `encode_one(index, cache, buffer, out)` for every example, in
    /// chunks on rayon's pool, and joins the results in order: the tokens,
    /// the offsets, and the value `encode_one` returned for each example.
    fn encode_all<F>(&self, count: usize, encode_one: F) -> Result<(Vec<u32>, Vec<i64>, Vec<i64>)>
    where
        F: Fn(usize, &mut Cache, &mut String, &mut Vec<u32>) -> Result<i64> + Sync,
    {
        type Part = (Vec<u32>, Vec<i64>, Vec<i64>);
        let run = |range: std::ops::Range<usize>| -> Result<Part> {
            let mut cache = Cache::default();
            let mut buffer = String::new();
            let mut tokens = Vec::new();
            let mut ends = Vec::with_capacity(range.len());
            let mut values = Vec::with_capacity(range.len());
            for index in range {
                values.push(encode_one(index, &mut cache, &mut buffer, &mut tokens)?);
                ends.push(tokens.len() as i64);
            }
            Ok((tokens, ends, values))
        };
        let threads = if parallelism_available() {
            rayon::current_num_threads()
        } else {
            1
        };
        let chunk = count.div_ceil(threads * 4).max(256);
        let ranges: Vec<_> = (0..count)
            .step_by(chunk)
            .map(|s| s..(s + chunk).min(count))
            .collect();
        let parts: Vec<Part> = if threads > 1 && ranges.len() > 1 {
            ranges.into_par_iter().map(run).collect::<Result<_>>()?
        } else {
            ranges.into_iter().map(run).collect::<Result<_>>()?
        };
        let total = parts.iter().map(|p| p.0.len()).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut offsets = Vec::with_capacity(count + 1);
        let mut all_values = Vec::with_capacity(count);
        offsets.push(0);
        for (part, ends, values) in parts {
            let base = tokens.len() as i64;
            offsets.extend(ends.iter().map(|e| e + base));
            tokens.extend_from_slice(&part);
            all_values.extend_from_slice(&values);
        }
        Ok((tokens, offsets, all_values))
    }

    /// Ids of each text, as one flat array and `texts.len() + 1` offsets.
    pub fn encode_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        special: bool,
    ) -> Result<(Vec<u32>, Vec<i64>)> {
        let (tokens, offsets, _) = self.encode_all(texts.len(), |i, cache, _, out| {
            self.encode_into(texts[i].as_ref(), special, cache, out)
                .map(|()| 0)
        })?;
        Ok((tokens, offsets))
    }

    /// Tokenizes prompt/response pairs: each prompt (with `format`'s text
    /// around it) and each response (likewise) are encoded separately and
    /// joined, so a prompt's tokens are those a generation from it sees.
    /// `max_length` cuts each example, the response first.
    pub fn encode_pairs<S: AsRef<str> + Sync>(
        &self,
        prompts: &[S],
        responses: Option<&[S]>,
        format: &PairFormat,
        max_length: Option<usize>,
    ) -> Result<EncodedPairs> {
        if let Some(responses) = responses {
            if responses.len() != prompts.len() {
                return Err(Error::InvalidArgument(format!(
                    "{} prompts but {} responses",
                    prompts.len(),
                    responses.len()
                )));
            }
        }
        let (tokens, offsets, prompt_lengths) =
            self.encode_all(prompts.len(), |i, cache, buffer, out| {
                let start = out.len();
                buffer.clear();
                buffer.push_str(&format.prompt_before);
                buffer.push_str(prompts[i].as_ref());
                buffer.push_str(&format.prompt_after);
                self.encode_into(buffer, format.prompt_special_tokens, cache, out)?;
                let prompt_length = out.len() - start;
                if let Some(responses) = responses {
                    buffer.clear();
                    buffer.push_str(&format.response_before);
                    buffer.push_str(responses[i].as_ref());
                    buffer.push_str(&format.response_after);
                    self.encode_into(buffer, false, cache, out)?;
                }
                let length = out.len() - start;
                let kept = max_length.map_or(length, |m| length.min(m));
                out.truncate(start + kept);
                Ok(prompt_length.min(kept) as i64)
            })?;
        Ok(EncodedPairs {
            tokens,
            offsets,
            prompt_lengths,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(text: &str) -> Vec<String> {
        let mut pieces = Vec::new();
        split_gpt2(text.as_bytes(), &mut |p| {
            pieces.push(String::from_utf8(p.to_vec()).unwrap());
            Ok(())
        })
        .unwrap();
        pieces
    }

    #[test]
    fn scanner_follows_the_gpt2_pattern() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(split("it's 42 ok"), ["it", "'s", " 42", " ok"]);
        assert_eq!(split("a   b"), ["a", "  ", " b"]);
        assert_eq!(split("a \n\nb"), ["a", " \n", "\n", "b"]);
        assert_eq!(split("x!!'s y"), ["x", "!!'", "s", " y"]);
        assert_eq!(split("end  "), ["end", "  "]);
        assert_eq!(split(" 'll"), [" '", "ll"]);
        assert_eq!(split("'ll'x"), ["'ll", "'", "x"]);
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let chars = byte_chars();
        assert_eq!(chars[b' ' as usize], '\u{120}');
        assert_eq!(chars[b'\n' as usize], '\u{10a}');
        assert_eq!(chars[b'a' as usize], 'a');
        let distinct: std::collections::HashSet<char> = chars.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
