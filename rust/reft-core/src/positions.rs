//! Choosing which token positions an intervention edits.
//!
//! A position spec says which prompt tokens of each example an intervention
//! edits. The string forms are pyreft's (`f{p}+l{s}`, `f{p}`, `l{s}`) plus
//! `all` and explicit index lists (`0,2,-1`, negative counting back from the
//! end of the prompt). [`locate`] turns a spec and the prompt lengths of a
//! whole dataset into one array of token indices of shape
//! `(groups, examples, width)`, [`MASKED`] in unused slots.
//!
//! The selection follows pyreft's clamp rule: with `n` the number of prompt
//! tokens that may be chosen, an example keeps the first `min(n / 2, p)` and
//! the last `min(n / 2, s)` of them, so the two ends never overlap.
//!
//! Groups: with `share_weights` (or a one-sided spec, `all`, or an index list)
//! there is one group per example holding every chosen position; otherwise
//! `f{p}+l{s}` gives two groups, the first `p` positions (group 0) and the
//! last `s` (group 1), for a prefix and a suffix intervention at each layer.

use std::fmt;
use std::mem::MaybeUninit;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::parallel::for_each_chunk;

/// The value of an unused slot in a locations array. Never a real token.
pub const MASKED: i64 = -1;

/// Largest count accepted in `f{p}` / `l{s}` and largest index list: beyond
/// this a spec is a mistake, and the output would be absurdly large.
pub const MAX_SPEC_POSITIONS: usize = 65_536;

/// Examples handled by one task when work is split across threads.
const EXAMPLES_PER_CHUNK: usize = 8_192;

/// A parsed position spec.
///
/// # Example
/// ```
/// use reft_core::positions::PositionSpec;
/// let spec: PositionSpec = "f7+l7".parse().unwrap();
/// assert_eq!(spec, PositionSpec::FirstLast { first: 7, last: 7 });
/// assert_eq!(spec.to_string(), "f7+l7");
/// assert!("f-1".parse::<PositionSpec>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PositionSpec {
    /// The first `first` and the last `last` prompt tokens (`f{p}+l{s}`,
    /// `f{p}` with `last == 0`, `l{s}` with `first == 0`).
    FirstLast {
        /// How many tokens from the start of the prompt.
        first: usize,
        /// How many tokens from the end of the prompt.
        last: usize,
    },
    /// Every prompt token.
    All,
    /// Explicit token indices; a negative index counts back from the end of
    /// the prompt (`-1` is its last token). Indices past the prompt are masked.
    Indices(Vec<i64>),
    /// A vision-language model's image tokens of the prompt, chosen by the
    /// inner spec counted over them alone (`image` is `image:all`,
    /// `image:f4` the first four image tokens, `image:l4` the last four).
    /// Needs the token ids ([`locate_in_tokens`]).
    Image(Box<PositionSpec>),
}

const EXPECTED_FORMS: &str =
    "expected f{p}+l{s}, f{p}, l{s}, all, a list of token indices such as 0,2,-1, \
     or image tokens: image, image:f{n}, image:l{n}, image:f{n}+l{n}";

impl PositionSpec {
    /// Parses a spec, naming the spec and the problem on failure.
    pub fn parse(spec: &str) -> Result<Self> {
        let fail = |reason: String| Error::PositionSpec {
            spec: spec.to_string(),
            reason,
        };
        let text = spec.trim();
        if text.is_empty() {
            return Err(fail(format!("the spec is empty; {EXPECTED_FORMS}")));
        }
        if text.eq_ignore_ascii_case("all") {
            return Ok(PositionSpec::All);
        }
        if let Some(rest) = text.strip_prefix("image") {
            let inner = match rest.trim() {
                "" => PositionSpec::All,
                rest => {
                    let Some(inner) = rest.strip_prefix(':') else {
                        return Err(fail(format!("unknown form; {EXPECTED_FORMS}")));
                    };
                    // The issue's long forms: image:first4 / image:last4.
                    let inner = inner.trim().replace("first", "f").replace("last", "l");
                    match PositionSpec::parse(&inner) {
                        Ok(PositionSpec::Image(_)) | Err(_) if inner.starts_with("image") => {
                            return Err(fail("image positions cannot nest".into()))
                        }
                        Ok(spec) => spec,
                        Err(Error::PositionSpec { reason, .. }) => {
                            return Err(fail(format!("after 'image:': {reason}")))
                        }
                        Err(other) => return Err(other),
                    }
                }
            };
            return Ok(PositionSpec::Image(Box::new(inner)));
        }
        let first_char = text.as_bytes()[0];
        if first_char == b'f' || first_char == b'l' {
            return Self::parse_first_last(text).map_err(fail);
        }
        if first_char == b'[' || first_char == b'-' || first_char.is_ascii_digit() {
            return Self::parse_indices(text).map_err(fail);
        }
        Err(fail(format!("unknown form; {EXPECTED_FORMS}")))
    }

    fn parse_first_last(text: &str) -> std::result::Result<Self, String> {
        let (head, tail) = match text.split_once('+') {
            Some((head, tail)) => (head.trim(), Some(tail.trim())),
            None => (text, None),
        };
        match tail {
            None => {
                let (letter, count) = parse_count(head)?;
                Ok(if letter == 'f' {
                    PositionSpec::FirstLast {
                        first: count,
                        last: 0,
                    }
                } else {
                    PositionSpec::FirstLast {
                        first: 0,
                        last: count,
                    }
                })
            }
            Some("") => Err(format!(
                "nothing after '+'; write the last-token count too, as in {head}+l3"
            )),
            Some(tail) => {
                let (head_letter, first) = parse_count(head)?;
                if head_letter != 'f' {
                    return Err(format!(
                        "with '+' the first part must be f{{p}} and the second l{{s}}, as in f3+l3; found {head:?}"
                    ));
                }
                let (tail_letter, last) = parse_count(tail)?;
                if tail_letter != 'l' {
                    return Err(format!(
                        "after '+' expected l{{s}} (the last-token count), found {tail:?}"
                    ));
                }
                Ok(PositionSpec::FirstLast { first, last })
            }
        }
    }

    fn parse_indices(text: &str) -> std::result::Result<Self, String> {
        let inner = match text.strip_prefix('[') {
            Some(rest) => rest
                .strip_suffix(']')
                .ok_or_else(|| "an index list opened with '[' must close with ']'".to_string())?,
            None => text,
        };
        let mut indices = Vec::new();
        for (number, item) in inner.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                return Err(format!("index list item {} is empty", number + 1));
            }
            let value: i64 = item.parse().map_err(|_| {
                format!(
                    "index list item {} ({item:?}) is not an integer; {EXPECTED_FORMS}",
                    number + 1
                )
            })?;
            if value.unsigned_abs() > MAX_SPEC_POSITIONS as u64 {
                return Err(format!(
                    "index {value} is out of the supported range ±{MAX_SPEC_POSITIONS}"
                ));
            }
            indices.push(value);
        }
        if indices.len() > MAX_SPEC_POSITIONS {
            return Err(format!(
                "the index list holds {} indices; at most {MAX_SPEC_POSITIONS} are supported",
                indices.len()
            ));
        }
        Ok(PositionSpec::Indices(indices))
    }

    /// Builds an index-list spec, checking each index is within range.
    pub fn from_indices(indices: Vec<i64>) -> Result<Self> {
        let spec = PositionSpec::Indices(indices);
        if let PositionSpec::Indices(list) = &spec {
            if list.is_empty() || list.len() > MAX_SPEC_POSITIONS {
                return Err(Error::PositionSpec {
                    spec: spec.to_string(),
                    reason: format!(
                        "an index list needs between 1 and {MAX_SPEC_POSITIONS} indices, found {}",
                        list.len()
                    ),
                });
            }
            if let Some(bad) = list
                .iter()
                .find(|v| v.unsigned_abs() > MAX_SPEC_POSITIONS as u64)
            {
                return Err(Error::PositionSpec {
                    spec: spec.to_string(),
                    reason: format!(
                        "index {bad} is out of the supported range ±{MAX_SPEC_POSITIONS}"
                    ),
                });
            }
        }
        Ok(spec)
    }

    /// How many position groups this spec gives per example.
    ///
    /// Two only for `f{p}+l{s}` with both counts positive and unshared weights.
    pub fn group_count(&self, share_weights: bool) -> usize {
        match self {
            PositionSpec::FirstLast { first, last }
                if *first > 0 && *last > 0 && !share_weights =>
            {
                2
            }
            PositionSpec::Image(inner) => inner.group_count(share_weights),
            _ => 1,
        }
    }

    /// The spec applied to the tokens it counts over: the inner spec of
    /// [`PositionSpec::Image`], else the spec itself.
    pub fn counted(&self) -> &PositionSpec {
        match self {
            PositionSpec::Image(inner) => inner,
            spec => spec,
        }
    }

    /// The width of a group, if it does not depend on the data (it does for `all`).
    pub fn fixed_width(&self, share_weights: bool) -> Option<usize> {
        match self {
            PositionSpec::FirstLast { first, last } => {
                Some(if self.group_count(share_weights) == 2 {
                    (*first).max(*last)
                } else {
                    first + last
                })
            }
            PositionSpec::All => None,
            PositionSpec::Indices(list) => Some(list.len()),
            PositionSpec::Image(inner) => inner.fixed_width(share_weights),
        }
    }
}

/// Parses `f12` or `l3` into its letter and a count in `1..=MAX_SPEC_POSITIONS`.
fn parse_count(part: &str) -> std::result::Result<(char, usize), String> {
    let mut chars = part.chars();
    let letter = match chars.next() {
        Some(c @ ('f' | 'l')) => c,
        _ => {
            return Err(format!(
                "expected f{{p}} or l{{s}}, found {part:?}; {EXPECTED_FORMS}"
            ))
        }
    };
    let digits = chars.as_str();
    let which = if letter == 'f' { "first" } else { "last" };
    if digits.is_empty() {
        return Err(format!(
            "'{letter}' must be followed by the number of {which} tokens, as in {letter}3"
        ));
    }
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "the count after '{letter}' must be a positive integer, found {digits:?}"
        ));
    }
    let count: usize = digits
        .parse()
        .ok()
        .filter(|c| *c <= MAX_SPEC_POSITIONS)
        .ok_or_else(|| format!("the count after '{letter}' is larger than {MAX_SPEC_POSITIONS}"))?;
    if count == 0 {
        return Err(format!(
            "the count after '{letter}' must be at least 1 (leave the part out instead)"
        ));
    }
    Ok((letter, count))
}

impl FromStr for PositionSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        PositionSpec::parse(s)
    }
}

impl fmt::Display for PositionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PositionSpec::FirstLast { first, last } => match (*first, *last) {
                (p, 0) => write!(f, "f{p}"),
                (0, s) => write!(f, "l{s}"),
                (p, s) => write!(f, "f{p}+l{s}"),
            },
            PositionSpec::All => f.write_str("all"),
            PositionSpec::Indices(list) => {
                let items: Vec<String> = list.iter().map(|v| v.to_string()).collect();
                f.write_str(&items.join(","))
            }
            PositionSpec::Image(inner) => match **inner {
                PositionSpec::All => f.write_str("image"),
                ref inner => write!(f, "image:{inner}"),
            },
        }
    }
}

/// Which side of a batch the padding tokens sit on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PaddingSide {
    /// Tokens first, padding after them: positions are unchanged.
    #[default]
    Right,
    /// Padding first: every position moves right by the example's padding.
    Left,
}

impl FromStr for PaddingSide {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "right" => Ok(PaddingSide::Right),
            "left" => Ok(PaddingSide::Left),
            other => Err(Error::PositionInput(format!(
                "padding_side must be \"left\" or \"right\", found {other:?}"
            ))),
        }
    }
}

/// How [`locate`] lays positions out.
#[derive(Debug, Clone, Default)]
pub struct LocateOptions {
    /// One group holding first and last positions (one intervention per layer)
    /// instead of a prefix group and a suffix group.
    pub share_weights: bool,
    /// Whether the last prompt token may be chosen. `true` follows the ReFT
    /// paper's scripts; `false` is pyreft's library datasets' convention.
    pub include_last: bool,
    /// Where the batch's padding sits.
    pub padding_side: PaddingSide,
    /// Length of the padded batch; defaults to the longest sequence. Only
    /// left padding moves positions, but any given value is checked.
    pub padded_length: Option<usize>,
    /// Whether large inputs may be split across rayon threads.
    pub parallel: bool,
}

impl LocateOptions {
    /// The defaults of `reft_rs.positions.locate`: unshared weights, the last
    /// prompt token included, right padding, parallel.
    pub fn new() -> Self {
        LocateOptions {
            share_weights: false,
            include_last: true,
            padding_side: PaddingSide::Right,
            padded_length: None,
            parallel: true,
        }
    }
}

/// Token positions for a dataset: a row-major `(groups, examples, width)`
/// array of token indices, [`MASKED`] where a slot is unused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locations {
    groups: usize,
    examples: usize,
    width: usize,
    data: Vec<i64>,
}

impl Locations {
    /// Wraps an existing row-major array, checking its length against the shape.
    pub fn new(groups: usize, examples: usize, width: usize, data: Vec<i64>) -> Result<Self> {
        let expected = checked_volume(&[groups, examples, width])?;
        if data.len() != expected {
            return Err(Error::Shape(format!(
                "locations of shape ({groups}, {examples}, {width}) need {expected} values, found {}",
                data.len()
            )));
        }
        Ok(Locations {
            groups,
            examples,
            width,
            data,
        })
    }

    /// `(groups, examples, width)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.groups, self.examples, self.width)
    }

    /// All values, row-major.
    pub fn as_slice(&self) -> &[i64] {
        &self.data
    }

    /// The `(examples, width)` block of one group.
    pub fn group(&self, group: usize) -> &[i64] {
        let size = self.examples * self.width;
        &self.data[group * size..(group + 1) * size]
    }

    /// The positions of one example in one group, [`MASKED`] slots included.
    pub fn row(&self, group: usize, example: usize) -> &[i64] {
        let start = (group * self.examples + example) * self.width;
        &self.data[start..start + self.width]
    }

    /// Gives up the values without copying them.
    pub fn into_vec(self) -> Vec<i64> {
        self.data
    }
}

/// Product of dimensions, or a shape error if it overflows.
pub(crate) fn checked_volume(dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, d| acc.checked_mul(*d))
        .ok_or_else(|| {
            Error::Shape(format!(
                "an array of shape {dims:?} is too large to address"
            ))
        })
}

/// Fills a fresh array of `groups × examples × width` values, one row per
/// `(group, example)`, with `fill_row(group, example, row)`, which must write
/// every slot of `row`.
fn build<F>(
    groups: usize,
    examples: usize,
    width: usize,
    parallel: bool,
    fill_row: F,
) -> Result<Locations>
where
    F: Fn(usize, usize, &mut [MaybeUninit<i64>]) + Sync + Send,
{
    let group_len = checked_volume(&[examples, width])?;
    let total = checked_volume(&[groups, group_len])?;
    let mut data = crate::memory::with_capacity(total, "positions")?;
    if total > 0 {
        let spare = &mut data.spare_capacity_mut()[..total];
        for (group, block) in spare.chunks_mut(group_len).enumerate() {
            for_each_chunk(
                block,
                EXAMPLES_PER_CHUNK * width,
                parallel,
                |chunk_index, chunk| {
                    let first_example = chunk_index * EXAMPLES_PER_CHUNK;
                    for (offset, row) in chunk.chunks_mut(width).enumerate() {
                        fill_row(group, first_example + offset, row);
                    }
                },
            );
        }
    }
    // SAFETY: every row of every group was handed to `fill_row`, whose
    // contract is to initialise all of its slots (the fillers below write the
    // chosen positions and then MASKED up to the row's end).
    unsafe { data.set_len(total) };
    Locations::new(groups, examples, width, data)
}

/// Writes `positions` followed by [`MASKED`] to the end of `row`.
#[inline(always)]
fn write_row(row: &mut [MaybeUninit<i64>], positions: impl Iterator<Item = i64>) {
    let mut written = 0;
    for (slot, value) in row.iter_mut().zip(positions) {
        slot.write(value);
        written += 1;
    }
    for slot in &mut row[written..] {
        slot.write(MASKED);
    }
}

/// Per-example lengths and padding offsets, validated once.
struct Extents<'a> {
    prompt_lengths: &'a [i64],
    offsets: Vec<i64>,
}

fn validate_extents<'a>(
    prompt_lengths: &'a [i64],
    sequence_lengths: Option<&[i64]>,
    options: &LocateOptions,
) -> Result<Extents<'a>> {
    if let Some(seq) = sequence_lengths {
        if seq.len() != prompt_lengths.len() {
            return Err(Error::PositionInput(format!(
                "sequence_lengths has {} entries but there are {} prompts",
                seq.len(),
                prompt_lengths.len()
            )));
        }
    }
    let sequence = |i: usize| sequence_lengths.map_or(prompt_lengths[i], |s| s[i]);
    for (i, &n) in prompt_lengths.iter().enumerate() {
        if n < 0 {
            return Err(Error::PositionInput(format!(
                "lengths[{i}] = {n} is negative"
            )));
        }
        let total = sequence(i);
        if total < n {
            return Err(Error::PositionInput(format!(
                "sequence_lengths[{i}] = {total} is shorter than the prompt (lengths[{i}] = {n})"
            )));
        }
    }
    let longest = (0..prompt_lengths.len()).map(sequence).max().unwrap_or(0);
    let padded = match options.padded_length {
        Some(padded) => {
            let padded = i64::try_from(padded).map_err(|_| {
                Error::PositionInput(format!("padded_length {padded} is too large"))
            })?;
            if let Some(i) = (0..prompt_lengths.len()).find(|&i| sequence(i) > padded) {
                return Err(Error::PositionInput(format!(
                    "padded_length {padded} is shorter than example {i}, which has {} tokens",
                    sequence(i)
                )));
            }
            padded
        }
        None => longest,
    };
    let offsets = match options.padding_side {
        PaddingSide::Right => Vec::new(),
        PaddingSide::Left => (0..prompt_lengths.len())
            .map(|i| padded - sequence(i))
            .collect(),
    };
    Ok(Extents {
        prompt_lengths,
        offsets,
    })
}

impl Extents<'_> {
    #[inline(always)]
    fn offset(&self, example: usize) -> i64 {
        if self.offsets.is_empty() {
            0
        } else {
            self.offsets[example]
        }
    }
}

/// Chooses the positions of every example of a dataset.
///
/// Args:
/// * `prompt_lengths`: prompt tokens per example.
/// * `sequence_lengths`: tokens per example in the batch (prompt plus
///   response), needed to place left padding when sequences are longer than
///   their prompts; defaults to `prompt_lengths`.
/// * `spec`: which positions.
/// * `options`: sharing, last-token convention and padding.
///
/// Returns the `(groups, examples, width)` locations (see the module docs).
///
/// # Example
/// ```
/// use reft_core::positions::{locate, LocateOptions, PositionSpec, MASKED};
/// let spec: PositionSpec = "f2+l2".parse().unwrap();
/// let locations = locate(&[10, 3], None, &spec, &LocateOptions::new()).unwrap();
/// assert_eq!(locations.shape(), (2, 2, 2));
/// assert_eq!(locations.row(0, 0), &[0, 1]); // prefix of example 0
/// assert_eq!(locations.row(1, 0), &[8, 9]); // suffix of example 0
/// assert_eq!(locations.row(0, 1), &[0, MASKED]); // 3 tokens: one at each end
/// assert_eq!(locations.row(1, 1), &[2, MASKED]);
/// ```
pub fn locate(
    prompt_lengths: &[i64],
    sequence_lengths: Option<&[i64]>,
    spec: &PositionSpec,
    options: &LocateOptions,
) -> Result<Locations> {
    if let PositionSpec::Image(_) = spec {
        return Err(Error::PositionInput(format!(
            "positions {spec:?} choose image tokens, which only the token ids tell apart: \
             locate them with the ids and the image token (locate_in_tokens)",
            spec = spec.to_string()
        )));
    }
    check_spec(spec)?;
    let extents = validate_extents(prompt_lengths, sequence_lengths, options)?;
    let usable = |n: i64| {
        if options.include_last {
            n
        } else {
            (n - 1).max(0)
        }
    };
    let longest = prompt_lengths.iter().map(|&n| usable(n)).max().unwrap_or(0);
    let extents = &extents;
    fill(spec, options, prompt_lengths.len(), longest, |example| {
        let n = usable(extents.prompt_lengths[example]);
        let offset = extents.offset(example);
        (n, move |i: i64| i + offset)
    })
}

/// Refuses an empty index list (a spec that cannot choose anything).
fn check_spec(spec: &PositionSpec) -> Result<()> {
    if let PositionSpec::Indices(list) = spec.counted() {
        if list.is_empty() {
            return Err(Error::PositionSpec {
                spec: String::new(),
                reason: "an index list needs at least one index".into(),
            });
        }
    }
    Ok(())
}

/// The locations of `examples` examples under `spec` (its counted part):
/// `candidates(example)` gives how many tokens may be chosen, `n`, and the
/// position of the i-th of them (`0 <= i < n`) in the padded batch.
/// `longest` is the largest `n`, the width of an `all` row.
fn fill<C, M>(
    spec: &PositionSpec,
    options: &LocateOptions,
    examples: usize,
    longest: i64,
    candidates: C,
) -> Result<Locations>
where
    C: Fn(usize) -> (i64, M) + Sync + Send,
    M: Fn(i64) -> i64,
{
    let groups = spec.group_count(options.share_weights);
    let width = match spec.fixed_width(options.share_weights) {
        Some(width) => width,
        None => longest.max(0) as usize,
    };
    match spec.counted() {
        PositionSpec::FirstLast { first, last } => {
            let (first, last) = (*first as i64, *last as i64);
            build(
                groups,
                examples,
                width,
                options.parallel,
                |group, example, row| {
                    let (n, at) = candidates(example);
                    let head = first.min(n / 2);
                    let tail = last.min(n / 2);
                    let head_positions = (0..head).map(&at);
                    let tail_positions = (n - tail..n).map(&at);
                    match (groups, group) {
                        (1, _) => write_row(row, head_positions.chain(tail_positions)),
                        (_, 0) => write_row(row, head_positions),
                        _ => write_row(row, tail_positions),
                    }
                },
            )
        }
        PositionSpec::All => build(
            groups,
            examples,
            width,
            options.parallel,
            |_, example, row| {
                let (n, at) = candidates(example);
                write_row(row, (0..n).map(at));
            },
        ),
        PositionSpec::Indices(list) => build(
            groups,
            examples,
            width,
            options.parallel,
            |_, example, row| {
                let (n, at) = candidates(example);
                for (slot, &index) in row.iter_mut().zip(list) {
                    let position = if index < 0 { n + index } else { index };
                    slot.write(if (0..n).contains(&position) {
                        at(position)
                    } else {
                        MASKED
                    });
                }
            },
        ),
        PositionSpec::Image(_) => Err(Error::PositionInput("image positions cannot nest".into())),
    }
}

/// Chooses the positions of every example of a vision-language dataset,
/// from its token ids: a spec counts over the prompt's text tokens only
/// (every token but `image_token`, the image placeholders the processor
/// expanded), and [`PositionSpec::Image`] over its image tokens only. So
/// `f3+l3` picks the first and last three words of the prompt whatever the
/// images between them, and `image:l4` the last four image tokens.
///
/// Args:
/// * `tokens`, `offsets`: every example's ids one after another; example
///   `i` is `tokens[offsets[i]..offsets[i + 1]]` (`offsets` holds one more
///   value than there are examples) and starts with its prompt.
/// * `prompt_lengths`: prompt tokens per example.
/// * `image_token`: the id of the image placeholder token.
/// * `sequence_lengths`: tokens per example in the padded batch; by
///   default each example's token count (`offsets[i + 1] - offsets[i]`).
/// * `options`: as in [`locate`]; `include_last=false` keeps the prompt's
///   last token from being chosen.
///
/// Returns the `(groups, examples, width)` locations, positions counted in
/// the whole (padded) sequence.
pub fn locate_in_tokens(
    tokens: &[i64],
    offsets: &[i64],
    prompt_lengths: &[i64],
    image_token: i64,
    sequence_lengths: Option<&[i64]>,
    spec: &PositionSpec,
    options: &LocateOptions,
) -> Result<Locations> {
    check_spec(spec)?;
    let examples = prompt_lengths.len();
    if offsets.len() != examples + 1 {
        return Err(Error::PositionInput(format!(
            "offsets has {} entries; {examples} examples need {}",
            offsets.len(),
            examples + 1
        )));
    }
    for i in 0..examples {
        let (start, end) = (offsets[i], offsets[i + 1]);
        if start < 0 || end < start || end as u64 > tokens.len() as u64 {
            return Err(Error::PositionInput(format!(
                "offsets[{i}..={}] = {start}..{end} is not a range of the {} tokens",
                i + 1,
                tokens.len()
            )));
        }
        if prompt_lengths[i] > end - start {
            return Err(Error::PositionInput(format!(
                "lengths[{i}] = {} is longer than example {i}'s {} tokens",
                prompt_lengths[i],
                end - start
            )));
        }
    }
    // Each example's sequence is its tokens, unless the caller says more.
    let counts: Vec<i64> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let extents = validate_extents(
        prompt_lengths,
        Some(sequence_lengths.unwrap_or(&counts)),
        options,
    )?;
    let images = matches!(spec, PositionSpec::Image(_));
    // Each example's candidate positions: its prompt's tokens of the class
    // the spec counts over, less the last prompt token when it is excluded.
    let candidates_of = |example: usize| -> Vec<i64> {
        let start = offsets[example] as usize;
        let prompt = extents.prompt_lengths[example];
        let usable = if options.include_last {
            prompt
        } else {
            (prompt - 1).max(0)
        };
        (0..usable)
            .filter(|&i| (tokens[start + i as usize] == image_token) == images)
            .collect()
    };
    let longest = (0..examples)
        .map(|e| candidates_of(e).len() as i64)
        .max()
        .unwrap_or(0);
    let extents = &extents;
    fill(spec, options, examples, longest, |example| {
        let list = candidates_of(example);
        let offset = extents.offset(example);
        (list.len() as i64, move |i: i64| list[i as usize] + offset)
    })
}

/// Chooses, per example, the tokens that overlap given character spans of the text.
///
/// Args:
/// * `token_offsets`: `(start, end)` character offsets of every token of every
///   example, concatenated (as a tokenizer's offset mapping gives them).
///   Tokens with `start == end` (special tokens) are never chosen.
/// * `token_counts`: how many of those tokens belong to each example.
/// * `char_spans`: `groups` spans per example, `(start, end)` with
///   `0 <= start <= end`, end exclusive, or `(-1, -1)` for none; example-major.
/// * `groups`: spans per example; each becomes a group of the output.
/// * `width`: slots per row; defaults to the largest selection. A selection
///   larger than a given width is an error, never silently cut.
/// * `sequence_lengths`, `padding_side`, `padded_length` as in [`locate`]
///   (sequence lengths default to `token_counts`).
///
/// Returns the `(groups, examples, width)` locations.
#[allow(clippy::too_many_arguments)]
pub fn locate_char_spans(
    token_offsets: &[[i64; 2]],
    token_counts: &[i64],
    char_spans: &[[i64; 2]],
    groups: usize,
    width: Option<usize>,
    sequence_lengths: Option<&[i64]>,
    options: &LocateOptions,
) -> Result<Locations> {
    let examples = token_counts.len();
    if groups == 0 {
        return Err(Error::PositionInput(
            "char spans need at least one span per example".into(),
        ));
    }
    if examples.checked_mul(groups) != Some(char_spans.len()) {
        return Err(Error::PositionInput(format!(
            "expected {groups} char span(s) for each of {examples} examples, found {} spans",
            char_spans.len()
        )));
    }
    let extents = validate_extents(token_counts, sequence_lengths, options)?;
    let mut starts = Vec::with_capacity(examples + 1);
    starts.push(0usize);
    let mismatch = || {
        Error::PositionInput(format!(
            "token_counts add up to {} tokens but {} token offsets were given",
            token_counts.iter().map(|&c| c as i128).sum::<i128>(),
            token_offsets.len()
        ))
    };
    for &count in token_counts {
        // Counts are checked non-negative above; their sum may still overflow.
        let next = starts[starts.len() - 1]
            .checked_add(count as usize)
            .ok_or_else(mismatch)?;
        starts.push(next);
    }
    if starts[examples] != token_offsets.len() {
        return Err(mismatch());
    }
    for (index, span) in char_spans.iter().enumerate() {
        let ok = (span[0] == -1 && span[1] == -1) || (0 <= span[0] && span[0] <= span[1]);
        if !ok {
            return Err(Error::PositionInput(format!(
                "char span {:?} of example {} is invalid: need 0 <= start <= end, or (-1, -1) for none",
                span,
                index / groups
            )));
        }
    }
    let overlaps = |token: &[i64; 2], span: &[i64; 2]| {
        token[0] < token[1] && span[0] < span[1] && token[0] < span[1] && token[1] > span[0]
    };
    let tokens_of = |example: usize| &token_offsets[starts[example]..starts[example + 1]];
    let selected = |example: usize, group: usize| {
        let span = &char_spans[example * groups + group];
        tokens_of(example)
            .iter()
            .filter(move |t| overlaps(t, span))
            .count()
    };
    let largest = (0..examples)
        .flat_map(|e| (0..groups).map(move |g| (e, g)))
        .map(|(e, g)| (selected(e, g), e))
        .max();
    let width = match (width, largest) {
        (Some(width), Some((count, example))) if count > width => {
            return Err(Error::PositionInput(format!(
                "example {example} has {count} tokens in a char span but max_positions is {width}"
            )))
        }
        (Some(width), _) => width,
        (None, largest) => largest.map_or(0, |(count, _)| count),
    };
    let extents = &extents;
    build(
        groups,
        examples,
        width,
        options.parallel,
        |group, example, row| {
            let span = &char_spans[example * groups + group];
            let offset = extents.offset(example);
            let chosen = tokens_of(example)
                .iter()
                .enumerate()
                .filter(|(_, t)| overlaps(t, span))
                .map(|(i, _)| i as i64 + offset);
            write_row(row, chosen);
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> PositionSpec {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(spec("f7+l7"), PositionSpec::FirstLast { first: 7, last: 7 });
        assert_eq!(
            spec(" f3 + l1 "),
            PositionSpec::FirstLast { first: 3, last: 1 }
        );
        assert_eq!(spec("f5"), PositionSpec::FirstLast { first: 5, last: 0 });
        assert_eq!(spec("l4"), PositionSpec::FirstLast { first: 0, last: 4 });
        assert_eq!(spec("all"), PositionSpec::All);
        assert_eq!(spec("0,2,-1"), PositionSpec::Indices(vec![0, 2, -1]));
        assert_eq!(spec("[3]"), PositionSpec::Indices(vec![3]));
        assert_eq!(spec("[ 1, -2 ]"), PositionSpec::Indices(vec![1, -2]));
    }

    #[test]
    fn display_round_trips() {
        for s in ["f7+l7", "f5", "l4", "all", "0,2,-1"] {
            assert_eq!(spec(s).to_string(), s);
            assert_eq!(spec(&spec(s).to_string()), spec(s));
        }
    }

    #[test]
    fn rejects_bad_specs_naming_them() {
        for bad in [
            "f-1",
            "x3",
            "f3+",
            "",
            "  ",
            "f",
            "l",
            "f0",
            "f3+f2",
            "l3+f2",
            "f1.5",
            "1,,2",
            "[1,2",
            "fa+l2",
            "f99999999999999999999",
        ] {
            match PositionSpec::parse(bad) {
                Err(Error::PositionSpec { spec, reason }) => {
                    assert_eq!(spec, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
    }

    #[test]
    fn image_specs_parse_display_and_refuse_plain_locating() {
        let image = |inner: PositionSpec| PositionSpec::Image(Box::new(inner));
        assert_eq!(spec("image"), image(PositionSpec::All));
        assert_eq!(spec("image:all"), image(PositionSpec::All));
        assert_eq!(
            spec("image:f4"),
            image(PositionSpec::FirstLast { first: 4, last: 0 })
        );
        assert_eq!(spec("image:first4"), spec("image:f4"));
        assert_eq!(spec("image:last2"), spec("image:l2"));
        assert_eq!(
            spec("image:f1+l2"),
            image(PositionSpec::FirstLast { first: 1, last: 2 })
        );
        for s in ["image", "image:f4", "image:l2", "image:f1+l2", "image:0,-1"] {
            assert_eq!(spec(s).to_string(), s);
        }
        assert_eq!(spec("image:f1+l2").group_count(false), 2);
        assert_eq!(spec("image:f1+l2").fixed_width(true), Some(3));
        for bad in ["image:", "image:image", "image:x", "images", "image:f0"] {
            match PositionSpec::parse(bad) {
                Err(Error::PositionSpec { spec, reason }) => {
                    assert_eq!(spec, bad);
                    assert!(!reason.is_empty());
                }
                other => panic!("{bad:?} parsed as {other:?}"),
            }
        }
        let err = locate(&[4], None, &spec("image"), &LocateOptions::new()).unwrap_err();
        assert!(err.to_string().contains("token ids"), "{err}");
    }

    #[test]
    fn token_positions_count_text_and_images_apart() {
        const IMG: i64 = 9;
        // Example 0: 2 words, 4 image tokens, 3 words, then a 2-token response.
        // Example 1: 1 word, 2 image tokens, 1 word (no response).
        let tokens = [
            1, 2, IMG, IMG, IMG, IMG, 3, 4, 5, 6, 7, //
            1, IMG, IMG, 2,
        ];
        let offsets = [0, 11, 15];
        let lengths = [9, 4];
        let at = |s: &str, options: &LocateOptions| {
            locate_in_tokens(&tokens, &offsets, &lengths, IMG, None, &spec(s), options).unwrap()
        };
        let shared = LocateOptions {
            share_weights: true,
            ..LocateOptions::new()
        };
        // Text: words only; f2+l2 over 5 words (0,1,6,7,8) and 2 words (0,3).
        let text = at("f2+l2", &shared);
        assert_eq!(text.row(0, 0), &[0, 1, 7, 8]);
        assert_eq!(text.row(0, 1), &[0, 3, MASKED, MASKED]);
        // Images: the image tokens alone.
        let images = at("image", &shared);
        assert_eq!(images.row(0, 0), &[2, 3, 4, 5]);
        assert_eq!(images.row(0, 1), &[1, 2, MASKED, MASKED]);
        let last = at("image:l1", &shared);
        assert_eq!((last.row(0, 0), last.row(0, 1)), (&[5][..], &[2][..]));
        let indices = at("image:0,-1", &shared);
        assert_eq!(indices.row(0, 0), &[2, 5]);
        // The last prompt token left out; left padding moves everything.
        let excluded = at(
            "l1",
            &LocateOptions {
                include_last: false,
                padding_side: PaddingSide::Left,
                padded_length: Some(12),
                ..LocateOptions::new()
            },
        );
        // Example 0 (11 tokens with its response, padding 1): the usable
        // words are 0, 1, 6, 7; the last, 7, moves to 8. Example 1: its only usable word is 0
        // (the last prompt token is left out), and the clamp rule keeps
        // min(1 / 2, 1) = 0 of one candidate.
        assert_eq!(excluded.row(0, 0), &[8]);
        assert_eq!(excluded.row(0, 1), &[MASKED]);
        // Sequence lengths given: padding follows them, not the token counts.
        let given = locate_in_tokens(
            &tokens,
            &offsets,
            &lengths,
            IMG,
            Some(&[9, 4]),
            &spec("l1"),
            &LocateOptions {
                padding_side: PaddingSide::Left,
                padded_length: Some(12),
                ..LocateOptions::new()
            },
        )
        .unwrap();
        assert_eq!(given.row(0, 0), &[3 + 8]);
        // Malformed inputs are errors, never a panic.
        for (offsets, lengths) in [
            (&[0, 11][..], &[9, 4][..]),
            (&[0, 16, 15][..], &[9, 4][..]),
            (&[0, 11, 15][..], &[12, 4][..]),
            (&[0, 11, 15][..], &[9, -1][..]),
        ] {
            let result = locate_in_tokens(
                &tokens,
                offsets,
                lengths,
                IMG,
                None,
                &spec("f1"),
                &LocateOptions::new(),
            );
            assert!(matches!(result, Err(Error::PositionInput(_))), "{result:?}");
        }
    }

    #[test]
    fn pyreft_clamp_rule_shared() {
        // pyreft: last_position=10, f3+l3 shared -> [0,1,2,7,8,9]
        let locations = locate(
            &[10],
            None,
            &spec("f3+l3"),
            &LocateOptions {
                share_weights: true,
                ..LocateOptions::new()
            },
        )
        .unwrap();
        assert_eq!(locations.shape(), (1, 1, 6));
        assert_eq!(locations.row(0, 0), &[0, 1, 2, 7, 8, 9]);
        // a 4-token prompt keeps 2 at each end: [0,1,2,3,-1,-1]
        let locations = locate(
            &[4],
            None,
            &spec("f3+l3"),
            &LocateOptions {
                share_weights: true,
                ..LocateOptions::new()
            },
        )
        .unwrap();
        assert_eq!(locations.row(0, 0), &[0, 1, 2, 3, MASKED, MASKED]);
    }

    #[test]
    fn library_convention_excludes_last_token() {
        // pyreft's datasets: last_position = n - 1
        let options = LocateOptions {
            include_last: false,
            ..LocateOptions::new()
        };
        let locations = locate(&[11], None, &spec("f3+l3"), &options).unwrap();
        assert_eq!(locations.row(0, 0), &[0, 1, 2]);
        assert_eq!(locations.row(1, 0), &[7, 8, 9]);
    }

    #[test]
    fn unshared_groups_pad_to_the_wider_side() {
        let locations = locate(&[20], None, &spec("f2+l4"), &LocateOptions::new()).unwrap();
        assert_eq!(locations.shape(), (2, 1, 4));
        assert_eq!(locations.row(0, 0), &[0, 1, MASKED, MASKED]);
        assert_eq!(locations.row(1, 0), &[16, 17, 18, 19]);
    }

    #[test]
    fn tiny_prompts_are_fully_masked() {
        for n in [0, 1] {
            let locations = locate(&[n], None, &spec("f7+l7"), &LocateOptions::new()).unwrap();
            assert!(locations.as_slice().iter().all(|&v| v == MASKED));
        }
    }

    #[test]
    fn left_padding_shifts_by_each_examples_padding() {
        let options = LocateOptions {
            padding_side: PaddingSide::Left,
            padded_length: Some(12),
            ..LocateOptions::new()
        };
        // prompt 4 of a 6-token sequence in a 12-wide batch: offset 6
        let locations = locate(&[4], Some(&[6]), &spec("f1+l1"), &options).unwrap();
        assert_eq!(locations.row(0, 0), &[6]);
        assert_eq!(locations.row(1, 0), &[9]);
    }

    #[test]
    fn left_padding_defaults_to_the_longest_sequence() {
        let options = LocateOptions {
            padding_side: PaddingSide::Left,
            ..LocateOptions::new()
        };
        let locations = locate(&[2, 5], None, &spec("l1"), &options).unwrap();
        assert_eq!(locations.row(0, 0), &[4]);
        assert_eq!(locations.row(0, 1), &[4]);
    }

    #[test]
    fn all_and_index_lists() {
        let locations = locate(&[3, 1], None, &spec("all"), &LocateOptions::new()).unwrap();
        assert_eq!(locations.shape(), (1, 2, 3));
        assert_eq!(locations.row(0, 0), &[0, 1, 2]);
        assert_eq!(locations.row(0, 1), &[0, MASKED, MASKED]);
        let locations = locate(&[5, 2], None, &spec("0,3,-1,-3"), &LocateOptions::new()).unwrap();
        assert_eq!(locations.row(0, 0), &[0, 3, 4, 2]);
        assert_eq!(locations.row(0, 1), &[0, MASKED, 1, MASKED]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let s = spec("f1");
        assert!(matches!(
            locate(&[-1], None, &s, &LocateOptions::new()),
            Err(Error::PositionInput(_))
        ));
        assert!(matches!(
            locate(&[5], Some(&[4]), &s, &LocateOptions::new()),
            Err(Error::PositionInput(_))
        ));
        assert!(matches!(
            locate(&[5], Some(&[5, 6]), &s, &LocateOptions::new()),
            Err(Error::PositionInput(_))
        ));
        let options = LocateOptions {
            padded_length: Some(3),
            ..LocateOptions::new()
        };
        assert!(matches!(
            locate(&[5], None, &s, &options),
            Err(Error::PositionInput(_))
        ));
    }

    #[test]
    fn char_spans_choose_overlapping_tokens() {
        // "Paris is big": tokens [BOS](0,0) Paris(0,5) is(5,8) big(8,12)
        let offsets = [[0, 0], [0, 5], [5, 8], [8, 12]];
        let spans = |counts: &[i64], spans: &[[i64; 2]], groups, width| {
            locate_char_spans(
                &offsets,
                counts,
                spans,
                groups,
                width,
                None,
                &LocateOptions::new(),
            )
        };
        let locations = spans(&[4], &[[0, 5], [6, 12]], 2, None).unwrap();
        assert_eq!(locations.shape(), (2, 1, 2));
        assert_eq!(locations.row(0, 0), &[1, MASKED]);
        assert_eq!(locations.row(1, 0), &[2, 3]);
        let none = spans(&[4], &[[-1, -1]], 1, Some(3)).unwrap();
        assert_eq!(none.row(0, 0), &[MASKED; 3]);
        assert!(spans(&[4], &[[6, 12]], 1, Some(1)).is_err()); // wider than max_positions
        assert!(spans(&[4], &[[5, 2]], 1, None).is_err()); // start after end
        assert!(spans(&[3], &[[0, 2]], 1, None).is_err()); // counts disagree with offsets
    }
}
