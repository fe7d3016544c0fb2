//! The text of a reply as its tokens come: the one place where stop strings
//! are found and cut.
//!
//! Decoding is incremental: each new token decodes a window that starts at
//! the last complete character, so a reply of n tokens costs O(n), not
//! O(n²). Stop strings are searched in the new text only. The text handed
//! out holds back its end while it could be the start of a stop string, and
//! while a character is incomplete, so no piece of a stop string (and no
//! U+FFFD of half a character) is ever handed out; joined, the pieces are
//! the whole reply, cut before the first stop string it completes.

use super::text::Text;
use crate::error::Result;

/// A reply's text, built a token at a time (see the module's doc).
#[derive(Debug, Clone)]
pub struct ReplyText {
    stop: Vec<String>,
    /// Characters of the longest stop string.
    longest: usize,
    /// The complete characters so far, cut before a stop string.
    text: String,
    /// Bytes of `text` handed out.
    emitted: usize,
    stopped: bool,
    /// Tokens before the decoding window.
    prefix: usize,
    /// Tokens whose text is in `text`.
    read: usize,
}

impl ReplyText {
    /// An empty reply that stops at the first of `stop` (empty strings are
    /// ignored).
    pub fn new(stop: &[String]) -> Self {
        let stop: Vec<String> = stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        let longest = stop.iter().map(|s| s.chars().count()).max().unwrap_or(0);
        ReplyText {
            stop,
            longest,
            text: String::new(),
            emitted: 0,
            stopped: false,
            prefix: 0,
            read: 0,
        }
    }

    /// Whether a stop string has appeared (the reply is over).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The text so far, cut before a stop string (it may end in characters
    /// not yet handed out).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Takes in `tokens`, the whole reply so far (the tokens of earlier
    /// calls and any new ones), and returns the text to hand out now.
    /// `last`: the reply ends here, so nothing is held back.
    pub fn advance(&mut self, text: &Text, tokens: &[u32], last: bool) -> Result<String> {
        if !self.stopped && self.read < tokens.len() {
            self.extend(text, tokens, last)?;
        }
        let mut end = self.text.len();
        if !(last || self.stopped) {
            end -= self.held(&self.text[self.emitted..]);
        }
        let piece = self.text.get(self.emitted..end).unwrap_or("").to_string();
        self.emitted = self.emitted.max(end);
        Ok(piece)
    }

    fn extend(&mut self, text: &Text, tokens: &[u32], last: bool) -> Result<()> {
        let before = text.decode(&tokens[self.prefix..self.read])?;
        let after = text.decode(&tokens[self.prefix..])?;
        if after.len() <= before.len() || (!last && after.ends_with('\u{fffd}')) {
            return Ok(()); // an incomplete character: wait for the next token
        }
        // The window's text grows at its end; should a tokenizer rewrite the
        // window's start instead, the new part begins at a character.
        let mut start = before.len();
        while !after.is_char_boundary(start) {
            start += 1;
        }
        let searched = self.text.len();
        self.text.push_str(&after[start..]);
        self.prefix = self.read;
        self.read = tokens.len();
        if !self.stop.is_empty() {
            // A stop string that ends in the new text starts at most
            // `longest - 1` characters before it.
            let from = self.text[..searched]
                .char_indices()
                .rev()
                .nth(self.longest.saturating_sub(2))
                .map_or(0, |(at, _)| at);
            let from = if self.longest <= 1 { searched } else { from };
            if let Some(end) = self
                .stop
                .iter()
                .filter_map(|s| self.text[from..].find(s.as_str()).map(|at| from + at))
                .min()
            {
                self.text.truncate(end);
                self.stopped = true;
            }
        }
        Ok(())
    }

    /// Bytes at the end of `pending` that may begin a stop string.
    fn held(&self, pending: &str) -> usize {
        let starts: Vec<usize> = pending
            .char_indices()
            .rev()
            .take(self.longest.saturating_sub(1))
            .map(|(at, _)| at)
            .collect();
        // Longest tail first.
        for &at in starts.iter().rev() {
            let tail = &pending[at..];
            if self.stop.iter().any(|s| s.starts_with(tail)) {
                return pending.len() - at;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::ReplyText;
    use crate::engine::text::Text;
    use proptest::prelude::*;

    /// A byte-level tokenizer (GPT-2's byte alphabet, no merges): token `b`
    /// is byte `b`, so tokens can end inside a character.
    fn bytes_tokenizer() -> (tempfile::TempDir, Text) {
        let printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
        let mut vocab = serde_json::Map::new();
        let mut extra = 0;
        for byte in 0..=255u32 {
            let char = if printable.contains(&byte) {
                byte
            } else {
                extra += 1;
                256 + extra - 1
            };
            vocab.insert(char::from_u32(char).unwrap().to_string(), byte.into());
        }
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false});
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null, "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": []}
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let text = Text::from_folder(dir.path(), &[]).unwrap().unwrap();
        (dir, text)
    }

    /// The plain rule, as generation meets the text a character at a time:
    /// the shortest prefix that holds a stop string, cut before the earliest
    /// stop string in it. (Generation ends there, so a longer stop string
    /// that starts earlier but would end later never completes: with stop
    /// strings "✓é " and "é", the reply "✓é " gives "✓".)
    fn cut(text: &str, stop: &[String]) -> String {
        let ends = text.char_indices().map(|(at, c)| at + c.len_utf8());
        for end in ends {
            let prefix = &text[..end];
            let first = stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| prefix.find(s.as_str()))
                .min();
            if let Some(at) = first {
                return text[..at].to_string();
            }
        }
        text.to_string()
    }

    #[test]
    fn a_stop_string_inside_a_longer_one_ends_the_reply_first() {
        let (_dir, text) = bytes_tokenizer();
        let stop = vec!["✓é ".to_string(), "é".to_string()];
        let (out, stopped) = pieces(&text, "✓é ", &stop);
        assert!(stopped);
        assert_eq!(out.concat(), "✓");
        assert_eq!(cut("✓é ", &stop), "✓");
        // The longer one, started earlier, wins when it ends first.
        let stop = vec!["ab".to_string(), "bc".to_string()];
        assert_eq!(pieces(&text, "xabc", &stop).0.concat(), "x");
        assert_eq!(cut("xabc", &stop), "x");
    }

    /// The pieces `ReplyText` hands out, a token at a time, then the last
    /// call (as at an end-of-sequence token).
    fn pieces(text: &Text, reply: &str, stop: &[String]) -> (Vec<String>, bool) {
        let tokens: Vec<u32> = reply.bytes().map(u32::from).collect();
        let mut state = ReplyText::new(stop);
        let mut out = Vec::new();
        for end in 1..=tokens.len() {
            out.push(state.advance(text, &tokens[..end], false).unwrap());
            if state.stopped() {
                return (out, true);
            }
        }
        out.push(state.advance(text, &tokens, true).unwrap());
        (out, false)
    }

    #[test]
    fn the_tokenizer_is_byte_level() {
        let (_dir, text) = bytes_tokenizer();
        let tokens: Vec<u32> = "é".bytes().map(u32::from).collect();
        assert_eq!(text.decode(&tokens).unwrap(), "é");
        assert!(text.decode(&tokens[..1]).unwrap().ends_with('\u{fffd}'));
    }

    #[test]
    fn a_stop_string_is_cut_and_never_handed_out_in_part() {
        let (_dir, text) = bytes_tokenizer();
        let stop = vec!["END".to_string(), "\n\n".to_string(), String::new()];
        let (out, stopped) = pieces(&text, "one ENtwo END three", &stop);
        assert!(stopped);
        assert_eq!(out.concat(), "one ENtwo ");
        // "E" and "EN" were held back until the next byte ruled "END" out.
        assert!(
            out.iter().all(|p| !p.ends_with('E') && !p.ends_with("EN")),
            "{out:?}"
        );
        let (out, stopped) = pieces(&text, "ends in EN", &stop);
        assert!(!stopped);
        assert_eq!(out.last().unwrap(), "EN"); // the last call hands out what was held
        assert_eq!(out.concat(), "ends in EN");
    }

    #[test]
    fn half_a_character_is_never_handed_out() {
        let (_dir, text) = bytes_tokenizer();
        let (out, _) = pieces(&text, "naïve café ✓", &[]);
        assert_eq!(out.concat(), "naïve café ✓");
        assert!(out.iter().all(|p| !p.contains('\u{fffd}')), "{out:?}");
        assert!(out.iter().filter(|p| p.is_empty()).count() >= 4); // the first bytes of é, ï, ✓
    }

    #[test]
    fn each_token_decodes_a_window_of_a_few_tokens() {
        let (_dir, text) = bytes_tokenizer();
        let tokens: Vec<u32> = "a long réply ".repeat(40).bytes().map(u32::from).collect();
        let mut state = ReplyText::new(&["never".to_string()]);
        for end in 1..=tokens.len() {
            state.advance(&text, &tokens[..end], false).unwrap();
            // The window starts at the last complete character: at most the
            // bytes of one character (é) are decoded again.
            assert!(end - state.prefix <= 3, "{end} {}", state.prefix);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn joined_pieces_are_the_reply_cut_at_its_first_stop(
            reply in "[ab é✓\n]{0,24}",
            stop in proptest::collection::vec("[ab é✓\n]{0,3}", 0..3),
        ) {
            let (_dir, text) = bytes_tokenizer();
            let (out, stopped) = pieces(&text, &reply, &stop);
            let expected = cut(&reply, &stop);
            prop_assert_eq!(out.concat(), expected.clone());
            prop_assert_eq!(stopped, expected.len() < reply.len());
            for piece in &out {
                prop_assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{:?}", piece);
            }
        }
    }
}
