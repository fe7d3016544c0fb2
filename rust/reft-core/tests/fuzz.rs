//! In-process fuzzing on stable Rust: every file and string that reft-core
//! reads from outside, damaged in many ways, must end in a typed [`Error`]
//! of the expected kinds: never a panic, an abort, a hang or an error of
//! the wrong kind.
//!
//! Each harness starts from valid inputs written here the way their own
//! tools lay them out (a Hugging Face model folder, a GGUF file written by
//! candle's GGUF writer, reft_rs checkpoints of every intervention type,
//! position specs) and feeds them mutated: bytes flipped, set, inserted,
//! deleted, copied, cut off, integers overwritten with boundary values,
//! JSON values replaced, removed or added, generated structures. What loads
//! is then used (a forward pass, a chat template rendered, positions
//! located) so that accepted inputs are exercised too.
//!
//! `cargo test -p reft-core --test fuzz` runs about 110,000 cases from a
//! fixed seed. For a long run, scale the counts and pick a random seed:
//!
//! ```text
//! REFT_FUZZ_SCALE=10 REFT_FUZZ_SEED=random cargo test --release -p reft-core --test fuzz -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{json, Value};

use reft_core::checkpoint::{self, TensorRef};
use reft_core::config::{InterventionType, ReftConfig};
use reft_core::engine::{Engine, GenerateOptions, ModelConfig};
use reft_core::positions::{locate, locate_char_spans, LocateOptions, PaddingSide, PositionSpec};
use reft_core::{Error, ErrorKind};

// ---------------------------------------------------------------- budget ---

/// Cases of a harness: `base` times `REFT_FUZZ_SCALE` (default 1).
fn cases(base: u32) -> u32 {
    let scale = std::env::var("REFT_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    ((base as f64) * scale).max(1.0) as u32
}

/// A fixed seed unless `REFT_FUZZ_SEED` names one (`random` for a fresh one).
fn runner(name: &str, base: u32) -> TestRunner {
    let seed = match std::env::var("REFT_FUZZ_SEED").ok().as_deref() {
        None => 0x5eed_0000 ^ name.len() as u64,
        Some("random") => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ std::process::id() as u64
        }
        Some(s) => s.parse().expect("REFT_FUZZ_SEED is a number or `random`"),
    };
    let n = cases(base);
    eprintln!("fuzz {name}: {n} cases, seed {seed}");
    TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        max_shrink_iters: 2000,
        ..Config::default()
    })
}

/// Runs `cases` of `strategy` through `check`, with a watchdog: a case that
/// runs past [`CASE_LIMIT`] is a hang, reported with its harness and input.
fn fuzz<S: Strategy>(
    name: &'static str,
    base: u32,
    strategy: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let started = Instant::now();
    let mut runner = runner(name, base);
    let count = AtomicU64::new(0);
    let result = runner.run(&strategy, |value| {
        count.fetch_add(1, Ordering::Relaxed);
        let input = format!("{value:?}");
        let input_copy = input.clone();
        watchdog().begin(name, input);
        let t = Instant::now();
        let outcome = check(value);
        // REFT_FUZZ_SLOW=1 names the cases that take longest.
        if std::env::var_os("REFT_FUZZ_SLOW").is_some() && t.elapsed() > Duration::from_millis(50) {
            let shown: String = input_copy.chars().take(300).collect();
            eprintln!(
                "fuzz {name}: slow case, {:.2} s: {shown}",
                t.elapsed().as_secs_f64()
            );
        }
        watchdog().end();
        outcome
    });
    eprintln!(
        "fuzz {name}: {} inputs tried in {:.1} s",
        count.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
}

/// Longest a single case may take (debug builds on 2 cores included).
const CASE_LIMIT: Duration = Duration::from_secs(60);

struct Watchdog {
    current: Mutex<Option<(&'static str, String, Instant)>>,
}

impl Watchdog {
    fn begin(&self, name: &'static str, input: String) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((name, input, Instant::now()));
    }
    fn end(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

fn watchdog() -> &'static Watchdog {
    static DOG: OnceLock<Watchdog> = OnceLock::new();
    DOG.get_or_init(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(500));
            let guard = watchdog().current.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((name, input, since)) = &*guard {
                if since.elapsed() > CASE_LIMIT {
                    let shown: String = input.chars().take(4000).collect();
                    eprintln!(
                        "fuzz {name}: a case ran past {CASE_LIMIT:?} (a hang) on input {shown}"
                    );
                    std::process::exit(101);
                }
            }
        });
        Watchdog {
            current: Mutex::new(None),
        }
    })
}

/// An error of one of `kinds`, or a failure naming the kind and message.
fn expect_kind(error: &Error, kinds: &[ErrorKind], what: &str) -> Result<(), TestCaseError> {
    if kinds.contains(&error.kind()) {
        Ok(())
    } else {
        Err(TestCaseError::fail(format!(
            "{what}: an error of kind {:?} ({error}), expected one of {kinds:?}",
            error.kind()
        )))
    }
}

// ------------------------------------------------------------- mutations ---

/// Numbers where sizes and offsets break.
const BOUNDARY: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    31,
    32,
    255,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    1 << 40,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 7,
];

/// Text that breaks parsers when dropped anywhere in JSON or a template.
const SNIPPETS: &[&str] = &[
    "null",
    "-1",
    "0",
    "1e999",
    "-1e999",
    "1.5",
    "18446744073709551616",
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\u{0}",
    "\u{feff}",
    "\u{10ffff}",
    "../",
    "/etc/passwd",
    "NaN",
    "Infinity",
    "{{",
    "}}",
    "{%",
    "%}",
    "{% for x in range(99999999) %}",
    "{{ x * 99999999 }}",
    "{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}",
    "{{ 'a' * 100000000 }}",
    "\n",
    "é",
];

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Word(usize, usize, u8),
    Copy(usize, usize, usize),
    Snippet(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(a, b)| Mutation::Flip(a, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::Set(a, b)),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(a, b)| Mutation::Insert(a, b)),
        (any::<usize>(), 1usize..64).prop_map(|(a, n)| Mutation::Delete(a, n)),
        any::<usize>().prop_map(Mutation::Truncate),
        (
            any::<usize>(),
            0..BOUNDARY.len(),
            prop::sample::select(vec![1u8, 2, 4, 8])
        )
            .prop_map(|(a, v, w)| Mutation::Word(a, v, w)),
        (any::<usize>(), any::<usize>(), 1usize..256).prop_map(|(a, b, n)| Mutation::Copy(a, b, n)),
        (any::<usize>(), 0..SNIPPETS.len()).prop_map(|(a, s)| Mutation::Snippet(a, s)),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..6)
}

/// `bytes` with `mutations` applied, in order. Positions wrap around the
/// current length; `focus` (a prefix length, e.g. a header) takes most
/// positions when given, since that is where parsers look first.
fn mutate(bytes: &[u8], mutations: &[Mutation], focus: Option<usize>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for m in mutations {
        let at = |raw: usize, len: usize| -> usize {
            let len = len.max(1);
            match focus {
                Some(f) if !raw.is_multiple_of(4) => (raw / 4) % f.clamp(1, len),
                _ => raw % len,
            }
        };
        match m {
            Mutation::Flip(a, bit) => {
                if !out.is_empty() {
                    let i = at(*a, out.len());
                    out[i] ^= 1 << bit;
                }
            }
            Mutation::Set(a, b) => {
                if !out.is_empty() {
                    let i = at(*a, out.len());
                    out[i] = *b;
                }
            }
            Mutation::Insert(a, b) => {
                let i = at(*a, out.len() + 1).min(out.len());
                out.splice(i..i, b.iter().copied());
            }
            Mutation::Delete(a, n) => {
                if !out.is_empty() {
                    let i = at(*a, out.len());
                    let end = (i + n).min(out.len());
                    out.drain(i..end);
                }
            }
            Mutation::Truncate(a) => {
                let i = a % (out.len() + 1);
                out.truncate(i);
            }
            Mutation::Word(a, v, w) => {
                let w = *w as usize;
                if out.len() >= w {
                    let i = at(*a, out.len() - w + 1);
                    out[i..i + w].copy_from_slice(&BOUNDARY[*v].to_le_bytes()[..w]);
                }
            }
            Mutation::Copy(a, b, n) => {
                if !out.is_empty() {
                    let from = a % out.len();
                    let end = (from + n).min(out.len());
                    let chunk = out[from..end].to_vec();
                    let to = at(*b, out.len() + 1).min(out.len());
                    out.splice(to..to, chunk);
                }
            }
            Mutation::Snippet(a, s) => {
                let i = at(*a, out.len() + 1).min(out.len());
                out.splice(i..i, SNIPPETS[*s].bytes());
            }
        }
    }
    out
}

/// A JSON value with boundary numbers, awkward strings and small nests.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        prop::sample::select(BOUNDARY.to_vec()).prop_map(|n| json!(n)),
        prop::sample::select(vec![-1i64, -2, i64::MIN, i32::MIN as i64, -(1 << 40)])
            .prop_map(|n| json!(n)),
        prop::sample::select(vec![
            0.5f64,
            1.5,
            -0.0,
            1e-320,
            1e308,
            -1e308,
            f64::MAX,
            f64::MIN_POSITIVE,
            1e-5,
            10000.0
        ])
        .prop_map(|x| json!(x)),
        prop::sample::select(vec![
            "",
            "llama",
            "gpt2",
            "qwen2",
            "mistral",
            "silu",
            "gelu",
            "relu",
            "linear",
            "block_output",
            "mlp_output",
            "attention_output",
            "f1+l1",
            "l7",
            "all",
            "0,-1",
            "loreft",
            "red",
            "steer",
            "float16",
            "bfloat16",
            "../../x",
            "/tmp",
            "a/b",
            "LlamaForCausalLM",
            "\u{0}",
            "é"
        ])
        .prop_map(|s| json!(s)),
        "[a-z_.]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec(("[a-z_]{1,10}", inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A change to a JSON document at a path of child picks.
#[derive(Debug, Clone)]
enum JsonEdit {
    Replace(Vec<usize>, Value),
    Remove(Vec<usize>),
    Add(Vec<usize>, String, Value),
}

fn json_edits(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<JsonEdit>> {
    let path = prop::collection::vec(any::<usize>(), 0..5);
    let key = prop_oneof![
        prop::sample::select(keys.to_vec()).prop_map(String::from),
        "[a-z_]{1,8}"
    ];
    let edit = prop_oneof![
        3 => (path.clone(), json_value()).prop_map(|(p, v)| JsonEdit::Replace(p, v)),
        2 => path.clone().prop_map(JsonEdit::Remove),
        2 => (path, key, json_value()).prop_map(|(p, k, v)| JsonEdit::Add(p, k, v)),
    ];
    prop::collection::vec(edit, 1..4)
}

/// Follows `path` down `doc` (each pick modulo the children) as far as it goes.
fn walk<'a>(doc: &'a mut Value, path: &[usize]) -> &'a mut Value {
    let Some((&pick, rest)) = path.split_first() else {
        return doc;
    };
    let len = match doc {
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    };
    if len == 0 {
        return doc;
    }
    let child = match doc {
        Value::Array(a) => &mut a[pick % len],
        Value::Object(o) => o.values_mut().nth(pick % len).expect("in range"),
        _ => unreachable!(),
    };
    walk(child, rest)
}

fn edit_json(doc: &Value, edits: &[JsonEdit]) -> Value {
    let mut doc = doc.clone();
    for e in edits {
        match e {
            JsonEdit::Replace(path, v) => *walk(&mut doc, path) = v.clone(),
            JsonEdit::Remove(path) => {
                if let Some((last, parent)) = path.split_last() {
                    match walk(&mut doc, parent) {
                        Value::Array(a) if !a.is_empty() => {
                            let n = a.len();
                            a.remove(last % n);
                        }
                        Value::Object(o) if !o.is_empty() => {
                            let key = o.keys().nth(last % o.len()).expect("in range").clone();
                            o.remove(&key);
                        }
                        _ => {}
                    }
                }
            }
            JsonEdit::Add(path, key, v) => match walk(&mut doc, path) {
                Value::Object(o) => {
                    o.insert(key.clone(), v.clone());
                }
                Value::Array(a) => a.push(v.clone()),
                _ => {}
            },
        }
    }
    doc
}

/// A document damaged at the JSON level, at the byte level, or both.
#[derive(Debug, Clone)]
enum Damage {
    Json(Vec<JsonEdit>),
    Bytes(Vec<Mutation>),
    Both(Vec<JsonEdit>, Vec<Mutation>),
}

fn damage(keys: &'static [&'static str]) -> impl Strategy<Value = Damage> {
    prop_oneof![
        3 => json_edits(keys).prop_map(Damage::Json),
        2 => mutations().prop_map(Damage::Bytes),
        1 => (json_edits(keys), mutations()).prop_map(|(j, m)| Damage::Both(j, m)),
    ]
}

fn damaged(doc: &Value, damage: &Damage) -> Vec<u8> {
    match damage {
        Damage::Json(edits) => serde_json::to_vec_pretty(&edit_json(doc, edits)).unwrap(),
        Damage::Bytes(m) => mutate(&serde_json::to_vec_pretty(doc).unwrap(), m, None),
        Damage::Both(edits, m) => mutate(
            &serde_json::to_vec_pretty(&edit_json(doc, edits)).unwrap(),
            m,
            None,
        ),
    }
}

// ------------------------------------------------------------ positions ---

#[derive(Debug, Clone)]
enum SpecInput {
    Grammar(String),
    Bytes(Vec<u8>),
    Indices(Vec<i64>),
}

fn position_spec() -> impl Strategy<Value = SpecInput> {
    let number = prop_oneof![
        0i64..12,
        prop::sample::select(vec![-1i64, i64::MIN, i64::MAX, 1 << 40, 4294967296]),
    ];
    let part = prop_oneof![
        (
            prop::sample::select(vec!["f", "l", "F", "L", "", "x"]),
            number.clone()
        )
            .prop_map(|(p, n)| format!("{p}{n}")),
        Just("all".to_string()),
        Just("none".to_string()),
        Just(" ".to_string()),
        prop::collection::vec(number.clone(), 1..5).prop_map(|v| v
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",")),
    ];
    let joined = prop::collection::vec(
        (part, prop::sample::select(vec!["+", ",", "", "++", " + "])),
        1..4,
    )
    .prop_map(|parts| {
        let mut s = String::new();
        for (p, sep) in parts {
            if !s.is_empty() {
                s.push_str(sep);
            }
            s.push_str(&p);
        }
        s
    });
    prop_oneof![
        4 => joined.prop_map(SpecInput::Grammar),
        2 => ("f3+l3", mutations()).prop_map(|(s, m)| SpecInput::Bytes(mutate(s.as_bytes(), &m, None))),
        2 => prop::collection::vec(
            prop_oneof![-20i64..20, prop::sample::select(vec![i64::MIN, i64::MAX, 1 << 40])],
            0..8
        )
        .prop_map(SpecInput::Indices),
    ]
}

/// Sequence lengths: small ones, negative ones, and ones too large for any
/// machine's memory. (Lengths this machine can hold are real work: `all` on
/// 2³¹ tokens fills 16 GiB, correctly, in seconds; they are left out.)
fn lengths() -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(
        prop_oneof![
            8 => 0i64..40,
            1 => prop::sample::select(vec![-1i64, i64::MIN, i64::MAX, 1 << 40, 1 << 50]),
        ],
        0..6,
    )
}

#[test]
fn fuzz_position_specs_and_inputs() {
    let strategy = (
        position_spec(),
        lengths(),
        prop::option::of(lengths()),
        any::<(bool, bool, bool)>(),
        prop::option::of(prop_oneof![0usize..60, Just(usize::MAX), Just(1 << 40)]),
    );
    fuzz(
        "positions",
        40_000,
        strategy,
        |(spec, prompts, sequences, flags, padded)| {
            let parsed = match &spec {
                SpecInput::Grammar(s) => PositionSpec::parse(s),
                SpecInput::Bytes(b) => match std::str::from_utf8(b) {
                    Ok(s) => PositionSpec::parse(s),
                    Err(_) => return Ok(()),
                },
                SpecInput::Indices(v) => PositionSpec::from_indices(v.clone()),
            };
            let spec = match parsed {
                Ok(spec) => spec,
                Err(e) => {
                    return expect_kind(&e, &[ErrorKind::Position], "parsing a position spec")
                }
            };
            // A spec that parses prints as text that parses to itself.
            let again = PositionSpec::parse(&spec.to_string())
                .map_err(|e| TestCaseError::fail(format!("{spec} does not parse again: {e}")))?;
            prop_assert_eq!(&again, &spec);
            let options = LocateOptions {
                share_weights: flags.0,
                include_last: flags.1,
                padding_side: if flags.2 {
                    PaddingSide::Left
                } else {
                    PaddingSide::Right
                },
                padded_length: padded,
                parallel: false,
            };
            match locate(&prompts, sequences.as_deref(), &spec, &options) {
                Ok(locations) => {
                    let (groups, examples, width) = locations.shape();
                    prop_assert_eq!(examples, prompts.len());
                    prop_assert_eq!(locations.as_slice().len(), groups * examples * width);
                }
                Err(e) => expect_kind(
                    &e,
                    &[ErrorKind::Position, ErrorKind::Memory, ErrorKind::Shape],
                    "locating positions",
                )?,
            }
            Ok(())
        },
    );
}

#[test]
fn fuzz_char_spans() {
    let pair = || (-3i64..50, -3i64..50).prop_map(|(a, b)| [a, b]);
    let strategy = (
        prop::collection::vec(pair(), 0..24),
        prop::collection::vec(prop_oneof![-2i64..12, Just(i64::MAX)], 0..4),
        prop::collection::vec(pair(), 0..8),
        0usize..4,
        prop::option::of(prop_oneof![0usize..8, Just(usize::MAX)]),
        any::<bool>(),
    );
    fuzz(
        "char spans",
        10_000,
        strategy,
        |(offsets, counts, spans, groups, width, left)| {
            let options = LocateOptions {
                padding_side: if left {
                    PaddingSide::Left
                } else {
                    PaddingSide::Right
                },
                parallel: false,
                ..LocateOptions::new()
            };
            match locate_char_spans(&offsets, &counts, &spans, groups, width, None, &options) {
                Ok(locations) => prop_assert_eq!(locations.shape().1, counts.len()),
                Err(e) => expect_kind(
                    &e,
                    &[ErrorKind::Position, ErrorKind::Memory, ErrorKind::Shape],
                    "locating char spans",
                )?,
            }
            Ok(())
        },
    );
}

// ----------------------------------------------------------- checkpoints ---

const CHECKPOINT_KEYS: &[&str] = &[
    "format_version",
    "library_version",
    "save_id",
    "base_model",
    "name_or_path",
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "interventions",
    "name",
    "type",
    "layer",
    "component",
    "positions",
    "low_rank_dimension",
    "dtype",
    "dropout",
    "activation",
    "group",
    "metadata",
    "projection_bias",
    "share_weights",
    "include_last",
];

/// A valid checkpoint per intervention type and dtype, for the tiny model below.
fn checkpoint_seeds() -> &'static Vec<(String, Value, Vec<u8>)> {
    static SEEDS: OnceLock<Vec<(String, Value, Vec<u8>)>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut seeds = Vec::new();
        let dir = tempfile::tempdir().unwrap();
        for (i, kind) in InterventionType::ALL.iter().enumerate() {
            let dtype = ["float32", "float16", "bfloat16", "float64"][i % 4];
            let rank = if kind.is_low_rank() { "2" } else { "null" };
            let extra = if *kind == InterventionType::NoReft {
                r#", "projection_bias": true"#
            } else {
                ""
            };
            let text = format!(
                r#"{{"base_model": {{"name_or_path": "tiny", "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2}},
                    "interventions": [{{"name": "a", "type": "{kind}", "layer": 1, "component": "block_output",
                    "positions": "f1+l1", "low_rank_dimension": {rank}, "dtype": "{dtype}", "dropout": 0.0,
                    "activation": "relu", "group": 0{extra}}}]}}"#
            );
            let config = ReftConfig::from_json(&text, None).unwrap();
            let tensors: Vec<(String, Vec<usize>, reft_core::DType, Vec<u8>)> = config
                .parameters()
                .unwrap()
                .into_iter()
                .map(|p| {
                    let n = p.shape.iter().product::<usize>();
                    let data = match p.dtype {
                        reft_core::DType::Float32 => {
                            (0..n).flat_map(|j| (0.01 * j as f32).to_le_bytes()).collect()
                        }
                        _ => vec![0x11; n * p.dtype.size()],
                    };
                    (p.key, p.shape, p.dtype, data)
                })
                .collect();
            let refs: Vec<(&str, TensorRef<'_>)> = tensors
                .iter()
                .map(|(k, s, d, b)| {
                    (
                        k.as_str(),
                        TensorRef {
                            dtype: *d,
                            shape: s,
                            data: b,
                        },
                    )
                })
                .collect();
            let path = dir.path().join(format!("{kind}"));
            checkpoint::save(&path, &config, &refs).unwrap();
            let (config_file, tensor_file) = checkpoint::files(&path);
            let config: Value = serde_json::from_slice(&fs::read(config_file).unwrap()).unwrap();
            seeds.push((kind.to_string(), config, fs::read(tensor_file).unwrap()));
        }
        seeds
    })
}

/// The header length of a safetensors file: most damage goes there.
fn safetensors_header_end(bytes: &[u8]) -> usize {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    8 + n
}

#[derive(Debug, Clone)]
enum CheckpointDamage {
    Config(Damage),
    Tensors(Vec<Mutation>),
    Both(Damage, Vec<Mutation>),
    Generated(Value),
}

const CHECKPOINT_KINDS: &[ErrorKind] = &[
    ErrorKind::NotFound,
    ErrorKind::Io,
    ErrorKind::Config,
    ErrorKind::InvalidCheckpoint,
    ErrorKind::CorruptCheckpoint,
    ErrorKind::UnsupportedFormat,
];

/// A checkpoint config generated whole: fields of the right names with
/// values from the boundary set.
fn generated_checkpoint_config() -> impl Strategy<Value = Value> {
    let field = |values: BoxedStrategy<Value>| prop::option::of(values);
    let base = (
        field(json_value().boxed()),
        field(prop_oneof![Just(json!(8)), json_value()].boxed()),
        field(prop_oneof![Just(json!(2)), json_value()].boxed()),
    );
    let intervention = (
        field(prop_oneof![Just(json!("a")), json_value()].boxed()),
        field(
            prop::sample::select(InterventionType::ALL.map(|t| t.to_string()).to_vec())
                .prop_map(Value::String)
                .boxed(),
        ),
        field(
            prop_oneof![0i64..3, Just(-1), Just(i64::MAX)]
                .prop_map(|n| json!(n))
                .boxed(),
        ),
        field(json_value().boxed()),
        field(prop_oneof![Just(json!(2)), json_value()].boxed()),
        field(prop_oneof![Just(json!("float32")), json_value()].boxed()),
    );
    (base, prop::collection::vec(intervention, 0..3)).prop_map(|((name, hidden, layers), items)| {
        let mut base_model = serde_json::Map::new();
        base_model.insert("model_type".into(), json!("llama"));
        for (k, v) in [
            ("name_or_path", name),
            ("hidden_size", hidden),
            ("num_hidden_layers", layers),
        ] {
            if let Some(v) = v {
                base_model.insert(k.into(), v);
            }
        }
        let interventions: Vec<Value> = items
            .into_iter()
            .map(|(name, kind, layer, positions, rank, dtype)| {
                let mut o = serde_json::Map::new();
                o.insert("component".into(), json!("block_output"));
                for (k, v) in [
                    ("name", name),
                    ("type", kind),
                    ("layer", layer),
                    ("positions", positions),
                    ("low_rank_dimension", rank),
                    ("dtype", dtype),
                ] {
                    if let Some(v) = v {
                        o.insert(k.into(), v);
                    }
                }
                Value::Object(o)
            })
            .collect();
        json!({"format_version": 1, "base_model": base_model, "interventions": interventions})
    })
}

#[test]
fn fuzz_checkpoint_folders() {
    let seeds = checkpoint_seeds();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("ckpt");
    fs::create_dir(&folder).unwrap();
    let (config_file, tensor_file) = checkpoint::files(&folder);
    let model = tiny_model_folder();
    let engine = Engine::load(&model.path().join("llama"), None, Some(1)).unwrap();
    let damage = prop_oneof![
        3 => damage(CHECKPOINT_KEYS).prop_map(CheckpointDamage::Config),
        3 => mutations().prop_map(CheckpointDamage::Tensors),
        1 => (damage(CHECKPOINT_KEYS), mutations()).prop_map(|(d, m)| CheckpointDamage::Both(d, m)),
        1 => generated_checkpoint_config().prop_map(CheckpointDamage::Generated),
    ];
    let loaded = AtomicU64::new(0);
    fuzz(
        "checkpoint folders",
        20_000,
        (0..seeds.len(), damage),
        |(seed, damage)| {
            let (_, config, tensors) = &seeds[seed];
            let header = safetensors_header_end(tensors);
            let (config_bytes, tensor_bytes) = match &damage {
                CheckpointDamage::Config(d) => (damaged(config, d), tensors.clone()),
                CheckpointDamage::Tensors(m) => (
                    serde_json::to_vec(config).unwrap(),
                    mutate(tensors, m, Some(header)),
                ),
                CheckpointDamage::Both(d, m) => {
                    (damaged(config, d), mutate(tensors, m, Some(header)))
                }
                CheckpointDamage::Generated(v) => (serde_json::to_vec(v).unwrap(), tensors.clone()),
            };
            fs::write(&config_file, &config_bytes).unwrap();
            fs::write(&tensor_file, &tensor_bytes).unwrap();
            match checkpoint::load(&folder) {
                Ok(_) => {
                    loaded.fetch_add(1, Ordering::Relaxed);
                    // What loads is used: attached to the model and run.
                    match engine.add_adapter("fuzz", &folder) {
                        Ok(()) => {
                            let run = engine.logits_with(&[1, 2, 3, 4], Some("fuzz"), 1.0);
                            engine.remove_adapter("fuzz").unwrap();
                            if let Err(e) = run {
                                return Err(TestCaseError::fail(format!(
                                    "an adapter that loads fails to run: {e}"
                                )));
                            }
                        }
                        Err(e) => expect_kind(
                            &e,
                            &[
                                ErrorKind::Incompatible,
                                ErrorKind::InvalidCheckpoint,
                                ErrorKind::CorruptCheckpoint,
                                ErrorKind::Config,
                                ErrorKind::UnsupportedFormat,
                            ],
                            "attaching a checkpoint",
                        )?,
                    }
                    Ok(())
                }
                Err(e) => expect_kind(&e, CHECKPOINT_KINDS, "loading a checkpoint"),
            }
        },
    );
    eprintln!(
        "fuzz checkpoint folders: {} damaged checkpoints still loaded",
        loaded.load(Ordering::Relaxed)
    );
}

// ------------------------------------------------------- model folders ---

const MODEL_KEYS: &[&str] = &[
    "architectures",
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "eos_token_id",
    "bos_token_id",
    "hidden_act",
    "rope_scaling",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "layer_norm_epsilon",
    "torch_dtype",
    "sliding_window",
];

const TOKENIZER_KEYS: &[&str] = &[
    "version",
    "added_tokens",
    "normalizer",
    "pre_tokenizer",
    "post_processor",
    "decoder",
    "model",
    "type",
    "vocab",
    "unk_token",
    "merges",
    "id",
    "content",
    "special",
    "chat_template",
    "bos_token",
    "eos_token",
    "add_bos_token",
];

const HIDDEN: usize = 8;
const LAYERS: usize = 2;
const VOCAB: usize = 32;

fn model_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": 16,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "eos_token_id": 2,
        "bos_token_id": 1
    })
}

fn words() -> Vec<String> {
    let mut w: Vec<String> = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for c in 'a'..='z' {
        if w.len() < VOCAB - 1 {
            w.push(c.to_string());
        }
    }
    w.push("ab".into());
    w
}

/// A `tokenizer.json` as the tokenizers library writes one: a word-level
/// model over the tiny vocabulary, whitespace pre-tokenizer.
fn tokenizer_json() -> Value {
    let vocab: serde_json::Map<String, Value> = words()
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

const CHAT_TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] | trim }} {% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}";

fn tokenizer_config() -> Value {
    json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE})
}

/// Little-endian float32 bytes of `n` values.
fn floats(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7 + seed * 13) % 17) as f32 - 8.0) * 0.05)
        .collect()
}

/// A tiny llama as transformers saves one: `model.safetensors` with its
/// tensor names and shapes.
fn model_tensors() -> Vec<u8> {
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let mut add = |name: String, shape: Vec<usize>| {
        let n = shape.iter().product();
        let bytes = floats(n, name.len())
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        tensors.insert(name, (shape, bytes));
    };
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN]);
    add("model.norm.weight".into(), vec![HIDDEN]);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), vec![HIDDEN]);
        add(format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]);
        add(format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]);
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![HIDDEN / 2, HIDDEN],
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![HIDDEN / 2, HIDDEN],
        );
        add(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]);
        add(format!("{p}.mlp.gate_proj.weight"), vec![16, HIDDEN]);
        add(format!("{p}.mlp.up_proj.weight"), vec![16, HIDDEN]);
        add(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, 16]);
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, (shape, bytes))| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

/// A folder holding `llama/` (a Hugging Face layout) and `tiny.gguf`.
fn tiny_model_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let llama = dir.path().join("llama");
    write_model(&llama, &HfFiles::seed());
    fs::write(dir.path().join("tiny.gguf"), gguf_seed()).unwrap();
    dir
}

/// The files of a Hugging Face model folder, as bytes.
#[derive(Clone)]
struct HfFiles {
    config: Vec<u8>,
    tensors: Vec<u8>,
    tokenizer: Vec<u8>,
    tokenizer_config: Vec<u8>,
    generation: Vec<u8>,
}

impl HfFiles {
    fn seed() -> Self {
        HfFiles {
            config: serde_json::to_vec_pretty(&model_config()).unwrap(),
            tensors: model_tensors(),
            tokenizer: serde_json::to_vec(&tokenizer_json()).unwrap(),
            tokenizer_config: serde_json::to_vec(&tokenizer_config()).unwrap(),
            generation: serde_json::to_vec(&json!({"eos_token_id": [2, 3], "bos_token_id": 1}))
                .unwrap(),
        }
    }
}

fn write_model(folder: &Path, files: &HfFiles) {
    fs::create_dir_all(folder).unwrap();
    fs::write(folder.join("config.json"), &files.config).unwrap();
    fs::write(folder.join("model.safetensors"), &files.tensors).unwrap();
    fs::write(folder.join("tokenizer.json"), &files.tokenizer).unwrap();
    fs::write(
        folder.join("tokenizer_config.json"),
        &files.tokenizer_config,
    )
    .unwrap();
    fs::write(folder.join("generation_config.json"), &files.generation).unwrap();
}

const MODEL_KINDS: &[ErrorKind] = &[
    ErrorKind::ModelNotFound,
    ErrorKind::ModelLoad,
    ErrorKind::UnsupportedModel,
    ErrorKind::Tokenizer,
    ErrorKind::Io,
    ErrorKind::Memory,
];

/// Loads `path` and, when it loads, runs it: a forward pass, a short
/// greedy generation, a chat rendered and tokenized.
fn load_and_use(path: &Path) -> Result<(), TestCaseError> {
    let engine = match Engine::load(path, None, Some(1)) {
        Ok(engine) => std::sync::Arc::new(engine),
        Err(e) => return expect_kind(&e, MODEL_KINDS, "loading a model"),
    };
    let vocab = engine.config().vocab_size as u32;
    let ids: Vec<u32> = (0..5).map(|i| i % vocab.max(1)).collect();
    match engine.logits(&ids) {
        Ok(logits) => prop_assert_eq!(logits.len() % vocab.max(1) as usize, 0),
        Err(e) => expect_kind(&e, &[ErrorKind::InvalidArgument], "a forward pass")?,
    }
    if let Err(e) = engine.generate(std::slice::from_ref(&ids), &GenerateOptions::greedy(2)) {
        expect_kind(&e, &[ErrorKind::InvalidArgument], "generating")?;
    }
    if let Some(text) = engine.text() {
        let messages = json!([{"role": "user", "content": "a b c"}]);
        match text.render_chat(&messages, true) {
            Ok(prompt) => {
                if let Err(e) = text.encode(&prompt, true) {
                    expect_kind(&e, &[ErrorKind::Tokenizer], "encoding a chat")?;
                }
            }
            Err(e) => expect_kind(&e, &[ErrorKind::Tokenizer], "rendering a chat")?,
        }
        if let Err(e) = text.decode(&[0, 1, 2, 30, 31, 99999]) {
            expect_kind(&e, &[ErrorKind::Tokenizer], "decoding")?;
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum FolderDamage {
    Config(Damage),
    Tensors(Vec<Mutation>),
    Tokenizer(Damage),
    TokenizerConfig(Damage),
    Template(Vec<Mutation>),
    Generation(Damage),
}

#[test]
fn fuzz_model_configs_in_memory() {
    let seed = model_config();
    let path = PathBuf::from("config.json");
    fuzz("model config.json", 20_000, damage(MODEL_KEYS), |d| {
        let bytes = damaged(&seed, &d);
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return Ok(());
        };
        match ModelConfig::from_hf_json(text, &path) {
            Ok(c) => {
                prop_assert!(c.hidden_size > 0 && c.num_attention_heads > 0);
                Ok(())
            }
            Err(e) => expect_kind(
                &e,
                &[ErrorKind::ModelLoad, ErrorKind::UnsupportedModel],
                "reading config.json",
            ),
        }
    });
}

#[test]
fn fuzz_model_folders() {
    let seed = HfFiles::seed();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("model");
    write_model(&folder, &seed);
    load_and_use(&folder).unwrap();
    let config = model_config();
    let tokenizer = tokenizer_json();
    let tok_config = tokenizer_config();
    let generation: Value = serde_json::from_slice(&seed.generation).unwrap();
    let header = safetensors_header_end(&seed.tensors);
    let strategy = prop_oneof![
        3 => damage(MODEL_KEYS).prop_map(FolderDamage::Config),
        2 => mutations().prop_map(FolderDamage::Tensors),
        3 => damage(TOKENIZER_KEYS).prop_map(FolderDamage::Tokenizer),
        1 => damage(TOKENIZER_KEYS).prop_map(FolderDamage::TokenizerConfig),
        2 => mutations().prop_map(FolderDamage::Template),
        1 => damage(MODEL_KEYS).prop_map(FolderDamage::Generation),
    ];
    fuzz("model folders", 12_000, strategy, |d| {
        let mut files = seed.clone();
        match &d {
            FolderDamage::Config(x) => files.config = damaged(&config, x),
            FolderDamage::Tensors(m) => files.tensors = mutate(&seed.tensors, m, Some(header)),
            FolderDamage::Tokenizer(x) => files.tokenizer = damaged(&tokenizer, x),
            FolderDamage::TokenizerConfig(x) => files.tokenizer_config = damaged(&tok_config, x),
            FolderDamage::Template(m) => {
                let template = String::from_utf8_lossy(&mutate(CHAT_TEMPLATE.as_bytes(), m, None))
                    .into_owned();
                files.tokenizer_config = serde_json::to_vec(
                    &json!({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}),
                )
                .unwrap();
            }
            FolderDamage::Generation(x) => files.generation = damaged(&generation, x),
        }
        write_model(&folder, &files);
        load_and_use(&folder)
    });
}

// ------------------------------------------------------------------ GGUF ---

/// A tiny llama GGUF written by candle's GGUF writer, as llama.cpp's
/// converter names things: Q4_1 and Q8_0 blocks beside float32, a GPT-2
/// style vocabulary with a merge, a chat template.
fn gguf_seed() -> Vec<u8> {
    const D: usize = 32;
    const FF: usize = 64;
    let words = words();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], dtype: GgmlDType| {
        let n = shape.iter().product();
        let t = Tensor::from_vec(floats(n, name.len()), shape, &Device::Cpu).unwrap();
        tensors.push((name, QTensor::quantize(&t, dtype).unwrap()));
    };
    add("token_embd.weight".into(), &[VOCAB, D], GgmlDType::F32);
    add("output_norm.weight".into(), &[D], GgmlDType::F32);
    add("output.weight".into(), &[VOCAB, D], GgmlDType::Q8_0);
    for i in 0..LAYERS {
        let p = format!("blk.{i}");
        add(format!("{p}.attn_norm.weight"), &[D], GgmlDType::F32);
        add(format!("{p}.ffn_norm.weight"), &[D], GgmlDType::F32);
        add(format!("{p}.attn_q.weight"), &[D, D], GgmlDType::Q4_1);
        add(format!("{p}.attn_k.weight"), &[D / 2, D], GgmlDType::Q4_1);
        add(format!("{p}.attn_v.weight"), &[D / 2, D], GgmlDType::Q8_0);
        add(format!("{p}.attn_output.weight"), &[D, D], GgmlDType::Q4_1);
        add(format!("{p}.ffn_gate.weight"), &[FF, D], GgmlDType::Q4_1);
        add(format!("{p}.ffn_up.weight"), &[FF, D], GgmlDType::Q8_0);
        add(format!("{p}.ffn_down.weight"), &[D, FF], GgmlDType::F32);
    }
    use gguf_file::Value as V;
    let metadata: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(LAYERS as u32)),
        ("llama.context_length", V::U32(64)),
        ("llama.embedding_length", V::U32(D as u32)),
        ("llama.feed_forward_length", V::U32(FF as u32)),
        ("llama.attention.head_count", V::U32(2)),
        ("llama.attention.head_count_kv", V::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("smollm".into())),
        (
            "tokenizer.ggml.tokens",
            V::Array(words.iter().map(|w| V::String(w.clone())).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            V::Array(
                (0..words.len())
                    .map(|i| V::I32(if i < 5 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges",
            V::Array(vec![V::String("a b".into())]),
        ),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
        ("tokenizer.chat_template", V::String(CHAT_TEMPLATE.into())),
    ];
    let meta_refs: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    out.into_inner()
}

/// A tiny Gemma 3 or Phi-3 GGUF as llama.cpp's converter writes them: for
/// Gemma 3, q/k norms, norms after attention and MLP, a sliding window with
/// its own rotary base; for Phi-3, fused qkv and gate/up, a partial
/// rotation and LongRoPE factor tensors; both with a SentencePiece
/// vocabulary (`tokenizer.ggml.model = "llama"`, scores and token types).
fn gguf_family_seed(arch: &str) -> Vec<u8> {
    const D: usize = 32;
    const FF: usize = 64;
    const HD: usize = 16;
    let words = words();
    let phi3 = arch == "phi3";
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |name: String, shape: &[usize], dtype: GgmlDType| {
        let n = shape.iter().product();
        let t = Tensor::from_vec(floats(n, name.len()), shape, &Device::Cpu).unwrap();
        tensors.push((name, QTensor::quantize(&t, dtype).unwrap()));
    };
    add("token_embd.weight".into(), &[VOCAB, D], GgmlDType::Q8_0);
    add("output_norm.weight".into(), &[D], GgmlDType::F32);
    if phi3 {
        add(
            "rope_factors_short.weight".into(),
            &[HD / 4],
            GgmlDType::F32,
        );
        add("rope_factors_long.weight".into(), &[HD / 4], GgmlDType::F32);
    }
    for i in 0..LAYERS {
        let p = format!("blk.{i}");
        add(format!("{p}.attn_norm.weight"), &[D], GgmlDType::F32);
        add(format!("{p}.ffn_norm.weight"), &[D], GgmlDType::F32);
        add(
            format!("{p}.attn_output.weight"),
            &[D, 2 * HD],
            GgmlDType::F32,
        );
        add(format!("{p}.ffn_down.weight"), &[D, FF], GgmlDType::Q8_0);
        if phi3 {
            add(
                format!("{p}.attn_qkv.weight"),
                &[4 * HD, D],
                GgmlDType::Q8_0,
            );
            add(format!("{p}.ffn_up.weight"), &[2 * FF, D], GgmlDType::Q8_0);
        } else {
            add(format!("{p}.attn_q.weight"), &[2 * HD, D], GgmlDType::Q8_0);
            add(format!("{p}.attn_k.weight"), &[HD, D], GgmlDType::Q8_0);
            add(format!("{p}.attn_v.weight"), &[HD, D], GgmlDType::F32);
            add(format!("{p}.attn_q_norm.weight"), &[HD], GgmlDType::F32);
            add(format!("{p}.attn_k_norm.weight"), &[HD], GgmlDType::F32);
            add(
                format!("{p}.post_attention_norm.weight"),
                &[D],
                GgmlDType::F32,
            );
            add(format!("{p}.post_ffw_norm.weight"), &[D], GgmlDType::F32);
            add(format!("{p}.ffn_gate.weight"), &[FF, D], GgmlDType::Q8_0);
            add(format!("{p}.ffn_up.weight"), &[FF, D], GgmlDType::F32);
        }
    }
    use gguf_file::Value as V;
    let key = |k: &str| format!("{arch}.{k}");
    let mut metadata: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(arch.into())),
        (key("block_count"), V::U32(LAYERS as u32)),
        (key("context_length"), V::U32(64)),
        (key("embedding_length"), V::U32(D as u32)),
        (key("feed_forward_length"), V::U32(FF as u32)),
        (key("attention.head_count"), V::U32(2)),
        (key("attention.head_count_kv"), V::U32(1)),
        (key("attention.layer_norm_rms_epsilon"), V::F32(1e-6)),
        (key("rope.freq_base"), V::F32(10000.0)),
        ("tokenizer.ggml.model".into(), V::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(words.iter().map(|w| V::String(w.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            V::Array((0..words.len()).map(|i| V::F32(-(i as f32))).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(
                (0..words.len())
                    .map(|i| V::I32(if i < 5 { 3 } else { 1 }))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(2)),
        ("tokenizer.ggml.add_space_prefix".into(), V::Bool(false)),
    ];
    if phi3 {
        metadata.extend([
            (key("rope.dimension_count"), V::U32((HD / 2) as u32)),
            (key("rope.scaling.attn_factor"), V::F32(1.2)),
            (key("rope.scaling.original_context_length"), V::U32(16)),
        ]);
    } else {
        metadata.extend([
            (key("attention.key_length"), V::U32(HD as u32)),
            (key("attention.value_length"), V::U32(HD as u32)),
            (key("attention.sliding_window"), V::U32(4)),
            (key("rope.freq_base_swa"), V::F32(100.0)),
        ]);
    }
    let meta_refs: Vec<(&str, &V)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    gguf_file::write(&mut out, &meta_refs, &tensor_refs).unwrap();
    out.into_inner()
}

/// Where the tensor data starts: the metadata and tensor infos before it
/// are where the damage goes first.
fn gguf_header_end(bytes: &[u8]) -> usize {
    let mut cursor = std::io::Cursor::new(bytes);
    let content = gguf_file::Content::read(&mut cursor).unwrap();
    content.tensor_data_offset as usize
}

#[test]
fn fuzz_gguf_files() {
    let seed = gguf_seed();
    let header = gguf_header_end(&seed);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("model.gguf");
    fs::write(&file, &seed).unwrap();
    load_and_use(&file).unwrap();
    fuzz("GGUF files", 12_000, mutations(), |m| {
        fs::write(&file, mutate(&seed, &m, Some(header))).unwrap();
        load_and_use(&file)
    });
}

#[test]
fn fuzz_gguf_files_of_other_families() {
    for (arch, name) in [
        ("gemma3", "Gemma 3 GGUF files"),
        ("phi3", "Phi-3 GGUF files"),
    ] {
        let seed = gguf_family_seed(arch);
        let header = gguf_header_end(&seed);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.gguf");
        fs::write(&file, &seed).unwrap();
        load_and_use(&file).unwrap();
        fuzz(name, 4_000, mutations(), |m| {
            fs::write(&file, mutate(&seed, &m, Some(header))).unwrap();
            load_and_use(&file)
        });
    }
}

// ------------------------------------------------------------ tokenizers ---

/// GPT-2's printable stand-ins for the 256 byte values, as its byte-level
/// BPE vocabularies spell them.
fn gpt2_byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xa1..=0xac)
        .chain(0xae..=0xff)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut next = 256;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(next);
            next += 1;
        }
    }
    let mut by_byte = vec!['\0'; 256];
    for (b, c) in printable.iter().zip(chars) {
        by_byte[*b as usize] = char::from_u32(c).unwrap();
    }
    by_byte
}

/// A byte-level BPE `tokenizer.json` as GPT-2-style models ship it (the
/// layout the data pipeline's fast path reads), with two merges and a
/// template post-processor adding a BOS token.
fn bpe_tokenizer_json() -> Value {
    let mut vocab: Vec<String> = vec!["<|endoftext|>".into()];
    vocab.extend(gpt2_byte_chars().iter().map(|c| c.to_string()));
    vocab.extend(["Ġt".to_string(), "he".to_string()]);
    let vocab: serde_json::Map<String, Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(i, w)| (w, json!(i)))
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": ["Ġ t", "h e"]}
    })
}

#[test]
fn fuzz_batch_tokenizers() {
    use reft_core::tokenize::{BatchTokenizer, PairFormat};
    let seeds = [tokenizer_json(), bpe_tokenizer_json()];
    for seed in &seeds {
        BatchTokenizer::from_json(&seed.to_string()).unwrap();
    }
    let texts = [
        "the cat",
        "a b ab",
        "",
        "héllo\u{0} wörld",
        "<|endoftext|> the",
    ];
    let format = PairFormat {
        prompt_before: "<s> ".into(),
        prompt_after: " <|assistant|>".into(),
        response_after: " </s>".into(),
        prompt_special_tokens: true,
        ..PairFormat::default()
    };
    fuzz(
        "tokenizer.json",
        8_000,
        (0..seeds.len(), damage(TOKENIZER_KEYS)),
        |(seed, d)| {
            let bytes = damaged(&seeds[seed], &d);
            let Ok(text) = std::str::from_utf8(&bytes) else {
                return Ok(());
            };
            let tokenizer = match BatchTokenizer::from_json(text) {
                Ok(t) => t,
                Err(e) => {
                    return expect_kind(&e, &[ErrorKind::Tokenizer], "reading tokenizer.json")
                }
            };
            match tokenizer.encode_batch(&texts, true) {
                Ok((_, offsets)) => prop_assert_eq!(offsets.len(), texts.len() + 1),
                Err(e) => expect_kind(&e, &[ErrorKind::Tokenizer], "encoding a batch")?,
            }
            if let Err(e) = tokenizer.encode_pairs(&texts, Some(&texts), &format, Some(6)) {
                expect_kind(&e, &[ErrorKind::Tokenizer], "encoding pairs")?;
            }
            Ok(())
        },
    );
}
