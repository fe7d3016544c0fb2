//! `locate` against a plain, one-example-at-a-time statement of the rule.

use proptest::prelude::*;
use reft_core::positions::{locate, LocateOptions, PaddingSide, PositionSpec, MASKED};

/// The documented rule for one example, written as plainly as possible:
/// returns the rows of every group, unpadded.
fn reference_rows(
    spec: &PositionSpec,
    n: i64,
    share_weights: bool,
    include_last: bool,
) -> Vec<Vec<i64>> {
    let n = if include_last { n } else { (n - 1).max(0) };
    match spec {
        PositionSpec::FirstLast { first, last } => {
            let head_count = std::cmp::min(n / 2, *first as i64);
            let tail_count = std::cmp::min(n / 2, *last as i64);
            let mut head = Vec::new();
            for i in 0..head_count {
                head.push(i);
            }
            let mut tail = Vec::new();
            for i in (n - tail_count)..n {
                tail.push(i);
            }
            if *first > 0 && *last > 0 && !share_weights {
                vec![head, tail]
            } else {
                head.extend(tail);
                vec![head]
            }
        }
        PositionSpec::All => vec![(0..n).collect()],
        PositionSpec::Indices(list) => vec![list
            .iter()
            .map(|&i| {
                let p = if i < 0 { n + i } else { i };
                if p >= 0 && p < n {
                    p
                } else {
                    MASKED
                }
            })
            .collect()],
        // Image specs need token ids (`locate_in_tokens`, tested against
        // tests/reference.py from Python); the strategy makes none.
        PositionSpec::Image(_) => unreachable!("no image specs here"),
    }
}

fn spec_strategy() -> impl Strategy<Value = PositionSpec> {
    prop_oneof![
        (0usize..12, 0usize..12)
            .prop_filter("at least one side", |(f, l)| f + l > 0)
            .prop_map(|(first, last)| PositionSpec::FirstLast { first, last }),
        Just(PositionSpec::All),
        prop::collection::vec(-20i64..20, 1..6).prop_map(PositionSpec::Indices),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn matches_the_reference(
        spec in spec_strategy(),
        examples in prop::collection::vec((0i64..60, 0i64..30), 0..40),
        share_weights in any::<bool>(),
        include_last in any::<bool>(),
        left in any::<bool>(),
        extra_padding in 0usize..5,
    ) {
        let prompt: Vec<i64> = examples.iter().map(|e| e.0).collect();
        let sequence: Vec<i64> = examples.iter().map(|e| e.0 + e.1).collect();
        let longest = sequence.iter().copied().max().unwrap_or(0) as usize;
        let options = LocateOptions {
            share_weights,
            include_last,
            padding_side: if left { PaddingSide::Left } else { PaddingSide::Right },
            padded_length: Some(longest + extra_padding),
            parallel: false,
        };
        let locations = locate(&prompt, Some(&sequence), &spec, &options).unwrap();
        let (groups, count, width) = locations.shape();
        prop_assert_eq!(count, prompt.len());
        prop_assert_eq!(groups, spec.group_count(share_weights));
        for (example, (&n, &total)) in prompt.iter().zip(&sequence).enumerate() {
            let offset = if left { (longest + extra_padding) as i64 - total } else { 0 };
            let rows = reference_rows(&spec, n, share_weights, include_last);
            prop_assert_eq!(rows.len(), groups);
            for (group, row) in rows.iter().enumerate() {
                let mut expected: Vec<i64> = row.iter().map(|&p| if p == MASKED { p } else { p + offset }).collect();
                prop_assert!(expected.len() <= width);
                expected.resize(width, MASKED);
                prop_assert_eq!(locations.row(group, example), expected.as_slice());
            }
        }
    }

    #[test]
    fn parallel_equals_sequential(
        lengths in prop::collection::vec(0i64..400, 70_000..70_100),
        first in 1usize..9,
        last in 1usize..9,
        share_weights in any::<bool>(),
    ) {
        let spec = PositionSpec::FirstLast { first, last };
        let mut options = LocateOptions { share_weights, ..LocateOptions::new() };
        let parallel = locate(&lengths, None, &spec, &options).unwrap();
        options.parallel = false;
        let sequential = locate(&lengths, None, &spec, &options).unwrap();
        prop_assert_eq!(parallel, sequential);
    }
}

#[test]
fn first_and_last_never_overlap_and_stay_in_the_prompt() {
    let lengths: Vec<i64> = (0..300).collect();
    for share_weights in [false, true] {
        let locations = locate(
            &lengths,
            None,
            &"f9+l9".parse().unwrap(),
            &LocateOptions {
                share_weights,
                ..LocateOptions::new()
            },
        )
        .unwrap();
        for (example, &n) in lengths.iter().enumerate() {
            let mut chosen: Vec<i64> = (0..locations.shape().0)
                .flat_map(|g| locations.row(g, example).to_vec())
                .filter(|&p| p != MASKED)
                .collect();
            assert!(chosen.iter().all(|&p| (0..n).contains(&p)));
            let before = chosen.len();
            chosen.sort();
            chosen.dedup();
            assert_eq!(before, chosen.len(), "duplicate position for n={n}");
        }
    }
}
