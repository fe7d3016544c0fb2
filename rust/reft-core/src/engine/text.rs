//! Text in and out: the `tokenizers` crate for `tokenizer.json` (or the
//! vocabulary stored in a GGUF file) and the model's Jinja chat template.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::tokenize::guarded;

/// A tokenizer, the special tokens and the chat template of one model.
pub struct Text {
    tokenizer: Tokenizer,
    /// The chat template compiled once (`Err`: why it does not compile).
    chat: Option<std::result::Result<minijinja::Environment<'static>, String>>,
    bos_token: String,
    eos_token: String,
    /// Token ids that end generation.
    pub(crate) eos_ids: Vec<u32>,
}

fn token_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn template_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        // A list of named templates: take "default", else the first.
        Value::Array(items) => {
            let named = |want: Option<&str>| {
                items.iter().find_map(|item| {
                    let name = item.get("name")?.as_str()?;
                    if want.is_none_or(|w| w == name) {
                        item.get("template")?.as_str().map(str::to_string)
                    } else {
                        None
                    }
                })
            };
            named(Some("default")).or_else(|| named(None))
        }
        _ => None,
    }
}

impl Text {
    /// Reads `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`
    /// and `generation_config.json` from a model folder. `None` when the
    /// folder has no `tokenizer.json`.
    pub fn from_folder(folder: &Path, config_eos: &[u32]) -> Result<Option<Self>> {
        let file = folder.join("tokenizer.json");
        if !file.is_file() {
            return Ok(None);
        }
        let tokenizer = guarded(&format!("reading {}", file.display()), || {
            Tokenizer::from_file(&file)
        })?
        .map_err(|e| Error::Tokenizer(format!("cannot read {}: {e}", file.display())))?;
        let read_json = |name: &str| -> Result<Option<Value>> {
            let path = folder.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::ModelLoad {
                    path: path.clone(),
                    reason: format!("not valid JSON: {e}"),
                })
        };
        let tokenizer_config = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let generation = read_json("generation_config.json")?.unwrap_or(Value::Null);
        let jinja = folder.join("chat_template.jinja");
        let chat_template = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
        } else {
            template_text(tokenizer_config.get("chat_template"))
        };
        let bos_token = token_text(tokenizer_config.get("bos_token")).unwrap_or_default();
        let eos_token = token_text(tokenizer_config.get("eos_token")).unwrap_or_default();
        let mut eos_ids =
            super::config::token_ids(generation.get("eos_token_id")).map_err(|e| {
                Error::ModelLoad {
                    path: folder.join("generation_config.json"),
                    reason: format!("eos_token_id: {e}"),
                }
            })?;
        if eos_ids.is_empty() {
            eos_ids = config_eos.to_vec();
        }
        if eos_ids.is_empty() {
            eos_ids.extend(tokenizer.token_to_id(&eos_token));
        }
        Ok(Some(Text {
            tokenizer,
            chat: chat_template.map(compile_chat),
            bos_token,
            eos_token,
            eos_ids,
        }))
    }

    /// The tokenizer and template stored in a GGUF file's metadata.
    pub(crate) fn from_gguf(content: &gguf_file::Content) -> Result<Option<Self>> {
        if !content.metadata.contains_key("tokenizer.ggml.tokens") {
            return Ok(None);
        }
        let kind = content
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("gpt2");
        let mut tokenizer = match kind {
            "llama" => guarded("building the GGUF tokenizer", || {
                super::vocab::sentencepiece(content)
            })?
            .map_err(|e| Error::Tokenizer(format!("cannot build the GGUF tokenizer: {e}")))?,
            "gpt2" => guarded("building the GGUF tokenizer", || {
                Tokenizer::from_gguf(content)
            })?
            .map_err(|e| Error::Tokenizer(format!("cannot build the GGUF tokenizer: {e}")))?,
            other => {
                return Err(Error::Tokenizer(format!(
                    "the GGUF tokenizer model {other:?} is not supported (supported: gpt2, llama)"
                )))
            }
        };
        let meta = |key: &str| content.metadata.get(key);
        let pre = meta("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("gpt2");
        if kind == "gpt2" && !matches!(pre, "qwen2" | "smaug-bpe" | "lfm2" | "llama3") {
            // candle reads other GPT-2-style vocabularies with a prefix space
            // added; llama.cpp and transformers add one only when the file
            // says so, and split digits one by one for SmolLM.
            use tokenizers::pre_tokenizers::{
                byte_level::ByteLevel, digits::Digits, sequence::Sequence,
            };
            let prefix = meta("tokenizer.ggml.add_space_prefix")
                .and_then(|v| v.to_bool().ok())
                .unwrap_or(false);
            let byte_level = ByteLevel::new(prefix, true, true);
            if pre == "smollm" {
                tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
                    Digits::new(true).into(),
                    byte_level.into(),
                ])));
            } else {
                tokenizer.with_pre_tokenizer(Some(byte_level));
            }
        }
        let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let name = |id: Option<u32>| {
            id.and_then(|i| tokenizer.id_to_token(i))
                .unwrap_or_default()
        };
        let eos = id("tokenizer.ggml.eos_token_id");
        let chat_template = content
            .metadata
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
            .cloned();
        Ok(Some(Text {
            bos_token: name(id("tokenizer.ggml.bos_token_id")),
            eos_token: name(eos),
            eos_ids: end_of_generation(content, &tokenizer, eos),
            chat: chat_template.map(compile_chat),
            tokenizer,
        }))
    }

    /// Token ids of `text`; `special` adds the tokens the tokenizer's
    /// post-processor adds (as `tokenizer(text)` does in transformers).
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        guarded("encoding text", || self.tokenizer.encode(text, special))?
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Tokenizer(format!("cannot encode text: {e}")))
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        guarded("decoding tokens", || self.tokenizer.decode(ids, true))?
            .map_err(|e| Error::Tokenizer(format!("cannot decode tokens: {e}")))
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Renders `messages` (a JSON list of `{"role", "content"}` objects) with
    /// the chat template, ending with the assistant's turn opened when
    /// `add_generation_prompt`.
    pub fn render_chat(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let env = match &self.chat {
            None => {
                return Err(Error::Tokenizer(
                    "the model has no chat template; use generate() with plain text".into(),
                ))
            }
            Some(Err(reason)) => {
                return Err(Error::Tokenizer(format!(
                    "the chat template does not compile: {reason}"
                )))
            }
            Some(Ok(env)) => env,
        };
        let mut out = Capped(Vec::new());
        env.get_template("chat")
            .and_then(|t| {
                t.render_captured_to(
                    minijinja::context! {
                        messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                        add_generation_prompt => add_generation_prompt,
                        bos_token => self.bos_token.clone(),
                        eos_token => self.eos_token.clone(),
                    },
                    &mut out,
                )
            })
            .map_err(|e| match e.kind() {
                minijinja::ErrorKind::OutOfFuel => Error::Tokenizer(format!(
                    "the chat template ran past its budget of {CHAT_FUEL} steps \
                     (a template that loops or builds strings without end?)"
                )),
                minijinja::ErrorKind::WriteFailure => Error::Tokenizer(format!(
                    "the chat template wrote more than the {CHAT_BYTES} bytes a prompt may have"
                )),
                _ => Error::Tokenizer(format!("the chat template failed: {e}")),
            })?;
        String::from_utf8(out.0)
            .map_err(|_| Error::Tokenizer("the chat template wrote invalid UTF-8".into()))
    }
}

/// The tokens that end a generation, as llama.cpp gathers them from a GGUF
/// file: its end-of-sequence, end-of-turn and end-of-message ids, and the
/// tokens chat templates end a turn with, where the vocabulary has them.
fn end_of_generation(
    content: &gguf_file::Content,
    tokenizer: &Tokenizer,
    eos: Option<u32>,
) -> Vec<u32> {
    let vocab = tokenizer.get_vocab_size(true) as u32;
    let mut ids: Vec<u32> = eos.into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        ids.extend(
            content
                .metadata
                .get(key)
                .and_then(|v| v.to_u32().ok())
                .filter(|&i| i < vocab),
        );
    }
    for text in [
        "<end_of_turn>",
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|eom_id|>",
    ] {
        ids.extend(tokenizer.token_to_id(text));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Instructions (and about 64 bytes of values each) one chat render may
/// use: a real template spends a few hundred per message.
pub(crate) const CHAT_FUEL: u64 = 5_000_000;
/// Bytes a rendered chat may hold.
pub(crate) const CHAT_BYTES: usize = 16 << 20;

/// A buffer that refuses to grow past [`CHAT_BYTES`].
struct Capped(Vec<u8>);

impl std::io::Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + bytes.len() > CHAT_BYTES {
            return Err(std::io::Error::other("the rendered chat is too long"));
        }
        self.0.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The template in an environment that behaves like transformers' (blocks
/// trimmed, Python string methods, `raise_exception`).
fn compile_chat(template: String) -> std::result::Result<minijinja::Environment<'static>, String> {
    let mut env = minijinja::Environment::new();
    // A template comes from a file of unknown origin: it may loop or build
    // strings without end. Fuel bounds the instructions and the memory of
    // one render; the cap bounds what it returns.
    env.set_fuel(Some(CHAT_FUEL));
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template_owned("chat", template)
        .map_err(|e| e.to_string())?;
    Ok(env)
}
