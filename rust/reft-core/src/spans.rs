//! Reading and writing the hidden states at chosen token positions.
//!
//! [`gather`] copies the states that a locations array points at out of a
//! `(batch, sequence, hidden)` array into `(groups, batch, width, hidden)`;
//! [`scatter`] writes edited states back. Masked slots ([`MASKED`]) are read
//! as zeros and never written. The element type is generic: the copy is
//! bitwise, so `u16` carries float16 and bfloat16 storage alike.

use std::mem::MaybeUninit;

use crate::error::{Error, Result};
use crate::parallel::for_each_chunk;
use crate::positions::{checked_volume, MASKED};

/// Dimensions of a `(batch, sequence, hidden)` array of hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HiddenShape {
    /// Examples in the batch.
    pub batch: usize,
    /// Tokens per example (the padded length).
    pub sequence: usize,
    /// Values per token.
    pub hidden: usize,
}

/// A borrowed `(groups, batch, width)` locations array.
#[derive(Debug, Clone, Copy)]
pub struct LocationsView<'a> {
    /// The values, row-major.
    pub data: &'a [i64],
    /// Position groups.
    pub groups: usize,
    /// Examples; must equal the hidden states' batch.
    pub batch: usize,
    /// Slots per row.
    pub width: usize,
}

impl crate::positions::Locations {
    /// Borrows these locations for [`gather`] and [`scatter`].
    pub fn view(&self) -> LocationsView<'_> {
        let (groups, batch, width) = self.shape();
        LocationsView {
            data: self.as_slice(),
            groups,
            batch,
            width,
        }
    }
}

/// Checks that `locations` fit the hidden states: same batch, every value
/// [`MASKED`] or a token index below the sequence length.
fn validate(locations: &LocationsView<'_>, shape: HiddenShape, hidden_len: usize) -> Result<()> {
    let expected_hidden = checked_volume(&[shape.batch, shape.sequence, shape.hidden])?;
    if hidden_len != expected_hidden {
        return Err(Error::Shape(format!(
            "hidden states of shape ({}, {}, {}) need {expected_hidden} values, found {hidden_len}",
            shape.batch, shape.sequence, shape.hidden
        )));
    }
    let expected = checked_volume(&[locations.groups, locations.batch, locations.width])?;
    if locations.data.len() != expected {
        return Err(Error::Shape(format!(
            "locations of shape ({}, {}, {}) need {expected} values, found {}",
            locations.groups,
            locations.batch,
            locations.width,
            locations.data.len()
        )));
    }
    if locations.batch != shape.batch {
        return Err(Error::Shape(format!(
            "locations are for a batch of {} but the hidden states hold {}",
            locations.batch, shape.batch
        )));
    }
    let sequence = shape.sequence as i64;
    if let Some(index) = locations
        .data
        .iter()
        .position(|&v| v != MASKED && !(0..sequence).contains(&v))
    {
        let width = locations.width.max(1);
        let row = index / width;
        return Err(Error::Location(format!(
            "locations[{}, {}, {}] = {} but the sequence has {} tokens (valid: 0..{}, or {MASKED} for unused)",
            row / locations.batch.max(1),
            row % locations.batch.max(1),
            index % width,
            locations.data[index],
            shape.sequence,
            shape.sequence
        )));
    }
    Ok(())
}

/// Copies the hidden states at `locations` into a new
/// `(groups, batch, width, hidden)` array, with zeros in masked slots.
///
/// # Example
/// ```
/// use reft_core::spans::{gather, HiddenShape, LocationsView};
/// // batch 1, 3 tokens of 2 values each
/// let hidden = [0.0f32, 1.0, 10.0, 11.0, 20.0, 21.0];
/// let shape = HiddenShape { batch: 1, sequence: 3, hidden: 2 };
/// let locations = LocationsView { data: &[2, -1], groups: 1, batch: 1, width: 2 };
/// let out = gather(&hidden, shape, locations, true).unwrap();
/// assert_eq!(out, vec![20.0, 21.0, 0.0, 0.0]);
/// ```
pub fn gather<T>(
    hidden: &[T],
    shape: HiddenShape,
    locations: LocationsView<'_>,
    parallel: bool,
) -> Result<Vec<T>>
where
    T: Copy + Default + Send + Sync,
{
    validate(&locations, shape, hidden.len())?;
    let h = shape.hidden;
    let total = checked_volume(&[locations.groups, locations.batch, locations.width, h])?;
    let mut out = crate::memory::with_capacity::<T>(total, "gathered states")?;
    let row_len = locations.width * h;
    if row_len > 0 {
        let spare = &mut out.spare_capacity_mut()[..total];
        for_each_chunk(spare, row_len, parallel, |row, chunk| {
            let example = row % locations.batch;
            let slots = &locations.data[row * locations.width..(row + 1) * locations.width];
            for (&position, target) in slots.iter().zip(chunk.chunks_mut(h)) {
                if position == MASKED {
                    target.fill(MaybeUninit::new(T::default()));
                } else {
                    let source = (example * shape.sequence + position as usize) * h;
                    for (slot, value) in target.iter_mut().zip(&hidden[source..source + h]) {
                        slot.write(*value);
                    }
                }
            }
        });
    }
    // SAFETY: every row of `width * h` values was written above, masked
    // slots with `T::default()`, the others with a copy of a hidden state
    // (or the array is empty).
    unsafe { out.set_len(total) };
    Ok(out)
}

/// Writes `values` (`(groups, batch, width, hidden)`) into `hidden` at
/// `locations`, skipping masked slots. Where two slots name the same token,
/// the later group (then the later slot) wins.
pub fn scatter<T>(
    hidden: &mut [T],
    shape: HiddenShape,
    locations: LocationsView<'_>,
    values: &[T],
    parallel: bool,
) -> Result<()>
where
    T: Copy + Send + Sync,
{
    validate(&locations, shape, hidden.len())?;
    let h = shape.hidden;
    let expected = checked_volume(&[locations.groups, locations.batch, locations.width, h])?;
    if values.len() != expected {
        return Err(Error::Shape(format!(
            "values for locations ({}, {}, {}) and hidden size {h} need shape ({}, {}, {}, {h}) = {expected} values, found {}",
            locations.groups,
            locations.batch,
            locations.width,
            locations.groups,
            locations.batch,
            locations.width,
            values.len()
        )));
    }
    let example_len = shape.sequence * h;
    if example_len == 0 {
        return Ok(());
    }
    // One task per example: examples own disjoint rows of `hidden`, and the
    // groups of one example are applied in order, so the result is the same
    // however the work is split.
    for_each_chunk(hidden, example_len, parallel, |example, states| {
        for group in 0..locations.groups {
            let row = group * locations.batch + example;
            let slots = &locations.data[row * locations.width..(row + 1) * locations.width];
            for (slot, &position) in slots.iter().enumerate() {
                if position != MASKED {
                    let source = (row * locations.width + slot) * h;
                    let target = position as usize * h;
                    states[target..target + h].copy_from_slice(&values[source..source + h]);
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(batch: usize, sequence: usize, hidden: usize) -> HiddenShape {
        HiddenShape {
            batch,
            sequence,
            hidden,
        }
    }

    #[test]
    fn gather_then_scatter_restores_the_states() {
        let hidden: Vec<f32> = (0..2 * 4 * 3).map(|v| v as f32).collect();
        let data = [1, 3, 0, MASKED, 2, MASKED, 3, 3];
        let locations = LocationsView {
            data: &data,
            groups: 2,
            batch: 2,
            width: 2,
        };
        let gathered = gather(&hidden, shape(2, 4, 3), locations, false).unwrap();
        assert_eq!(&gathered[0..3], &hidden[3..6]); // group 0, example 0, slot 0 -> token 1
        assert_eq!(&gathered[9..12], &[0.0; 3]); // masked slot
        let mut restored = vec![0.0f32; hidden.len()];
        scatter(&mut restored, shape(2, 4, 3), locations, &gathered, false).unwrap();
        for (token, chunk) in restored.chunks(3).enumerate() {
            let touched = match token / 4 {
                0 => [1, 3, 2].contains(&(token % 4)),
                _ => [0, 3].contains(&(token % 4)),
            };
            let expected = if touched {
                &hidden[token * 3..token * 3 + 3]
            } else {
                &[0.0f32; 3][..]
            };
            assert_eq!(chunk, expected, "token {token}");
        }
    }

    #[test]
    fn bad_locations_are_errors_not_panics() {
        let hidden = vec![0u16; 2 * 5 * 4];
        let too_far = LocationsView {
            data: &[5],
            groups: 1,
            batch: 1,
            width: 1,
        };
        let err = gather(&hidden[..20], shape(1, 5, 4), too_far, false).unwrap_err();
        assert!(matches!(err, Error::Location(_)), "{err}");
        let negative = LocationsView {
            data: &[-2],
            groups: 1,
            batch: 1,
            width: 1,
        };
        assert!(matches!(
            gather(&hidden[..20], shape(1, 5, 4), negative, false),
            Err(Error::Location(_))
        ));
        let wrong_batch = LocationsView {
            data: &[0],
            groups: 1,
            batch: 1,
            width: 1,
        };
        assert!(matches!(
            gather(&hidden, shape(2, 5, 4), wrong_batch, false),
            Err(Error::Shape(_))
        ));
        let short = LocationsView {
            data: &[0, 1],
            groups: 1,
            batch: 1,
            width: 3,
        };
        assert!(matches!(
            gather(&hidden[..20], shape(1, 5, 4), short, false),
            Err(Error::Shape(_))
        ));
        let ok = LocationsView {
            data: &[0],
            groups: 1,
            batch: 1,
            width: 1,
        };
        let mut states = vec![0u16; 20];
        assert!(matches!(
            scatter(&mut states, shape(1, 5, 4), ok, &[1u16; 3], false),
            Err(Error::Shape(_))
        ));
        assert!(matches!(
            gather(&hidden, shape(1, 5, 4), ok, false),
            Err(Error::Shape(_))
        ));
    }
}
