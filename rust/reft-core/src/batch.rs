//! Padding examples of a flat token array into a batch.
//!
//! A tokenized dataset is one array of tokens and the offsets where each
//! example starts ([`crate::tokenize::EncodedPairs`] in that shape); a batch
//! is a few of its examples laid out in rows of equal width. [`pad_rows`]
//! writes the rows' token ids, attention mask and (for language modelling)
//! labels in one pass.

use crate::error::{Error, Result};

/// The label of tokens the loss skips (the prompt and the padding).
pub const IGNORE_INDEX: i64 = -100;

/// Where the rows go and what fills them.
#[derive(Clone, Copy, Debug)]
pub struct PadOptions {
    /// Row width, at least the longest chosen example.
    pub width: usize,
    /// The token padding fills with.
    pub pad_token_id: i64,
    /// Whether padding goes on the left (generation) or the right (training).
    pub left: bool,
}

/// Lays out examples `indices` of `tokens`/`offsets` in rows of
/// `options.width`: `ids` gets the tokens and padding, `mask` 1 on tokens,
/// and `labels` (when given, with `prompt_lengths`) the tokens after each
/// prompt and [`IGNORE_INDEX`] elsewhere. Each output holds
/// `indices.len() * width` values, row-major.
#[allow(clippy::too_many_arguments)]
pub fn pad_rows(
    tokens: &[i32],
    offsets: &[i64],
    prompt_lengths: Option<&[i64]>,
    indices: &[i64],
    options: PadOptions,
    ids: &mut [i64],
    mask: &mut [i64],
    mut labels: Option<&mut [i64]>,
) -> Result<()> {
    let examples = offsets.len().saturating_sub(1);
    let width = options.width;
    let cells = indices.len() * width;
    if ids.len() != cells
        || mask.len() != cells
        || labels.as_ref().is_some_and(|l| l.len() != cells)
    {
        return Err(Error::Shape(format!(
            "outputs must hold {} rows of {width}",
            indices.len()
        )));
    }
    if labels.is_some() && prompt_lengths.is_none_or(|p| p.len() != examples) {
        return Err(Error::Shape(format!(
            "labels need one prompt length for each of {examples} examples"
        )));
    }
    for (row, &index) in indices.iter().enumerate() {
        if index < 0 || index as usize >= examples {
            return Err(Error::InvalidArgument(format!(
                "example {index} is out of range for a dataset of {examples}"
            )));
        }
        let index = index as usize;
        let (start, end) = (offsets[index], offsets[index + 1]);
        if start < 0 || end < start || end as usize > tokens.len() {
            return Err(Error::InvalidArgument(format!(
                "example {index} spans tokens {start}..{end}, outside the {} tokens",
                tokens.len()
            )));
        }
        let length = (end - start) as usize;
        if length > width {
            return Err(Error::Shape(format!(
                "example {index} has {length} tokens, more than the width {width}"
            )));
        }
        let source = &tokens[start as usize..end as usize];
        let lead = if options.left { width - length } else { 0 };
        let span = row * width..(row + 1) * width;
        let (id_row, mask_row) = (&mut ids[span.clone()], &mut mask[span.clone()]);
        id_row.fill(options.pad_token_id);
        mask_row.fill(0);
        for (slot, &token) in id_row[lead..lead + length].iter_mut().zip(source) {
            *slot = i64::from(token);
        }
        mask_row[lead..lead + length].fill(1);
        if let (Some(labels), Some(prompts)) = (labels.as_deref_mut(), prompt_lengths) {
            let label_row = &mut labels[span];
            label_row.fill(IGNORE_INDEX);
            let prompt = (prompts[index].max(0) as usize).min(length);
            for (slot, &token) in label_row[lead + prompt..lead + length]
                .iter_mut()
                .zip(&source[prompt..])
            {
                *slot = i64::from(token);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_left_and_right_with_labels() {
        let tokens = [1, 2, 3, 4, 5];
        let offsets = [0, 3, 5];
        let prompts = [2, 1];
        for left in [false, true] {
            let options = PadOptions {
                width: 4,
                pad_token_id: 0,
                left,
            };
            let (mut ids, mut mask, mut labels) = (vec![9; 8], vec![9; 8], vec![9; 8]);
            pad_rows(
                &tokens,
                &offsets,
                Some(&prompts),
                &[1, 0],
                options,
                &mut ids,
                &mut mask,
                Some(&mut labels),
            )
            .unwrap();
            let x = IGNORE_INDEX;
            if left {
                assert_eq!(ids, [0, 0, 4, 5, 0, 1, 2, 3]);
                assert_eq!(mask, [0, 0, 1, 1, 0, 1, 1, 1]);
                assert_eq!(labels, [x, x, x, 5, x, x, x, 3]);
            } else {
                assert_eq!(ids, [4, 5, 0, 0, 1, 2, 3, 0]);
                assert_eq!(mask, [1, 1, 0, 0, 1, 1, 1, 0]);
                assert_eq!(labels, [x, 5, x, x, x, x, 3, x]);
            }
        }
    }

    #[test]
    fn rejects_bad_indices_and_widths() {
        let options = PadOptions {
            width: 2,
            pad_token_id: 0,
            left: false,
        };
        let (mut ids, mut mask) = (vec![0; 2], vec![0; 2]);
        let tokens = [1, 2, 3];
        let err = pad_rows(
            &tokens,
            &[0, 3],
            None,
            &[0],
            options,
            &mut ids,
            &mut mask,
            None,
        );
        assert!(err.unwrap_err().to_string().contains("more than the width"));
        let err = pad_rows(
            &tokens,
            &[0, 3],
            None,
            &[1],
            options,
            &mut ids,
            &mut mask,
            None,
        );
        assert!(err.unwrap_err().to_string().contains("out of range"));
        let err = pad_rows(
            &tokens,
            &[0, 9],
            None,
            &[0],
            options,
            &mut ids,
            &mut mask,
            None,
        );
        assert!(err.unwrap_err().to_string().contains("outside"));
    }
}
