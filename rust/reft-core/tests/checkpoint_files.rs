//! Checkpoint round trips, interrupted saves and damaged files.

use std::fs;
use std::path::Path;

use reft_core::checkpoint::{self, save_with_hook, SaveStep, TensorRef, CONFIG_FILE, TENSORS_FILE};
use reft_core::config::{DType, InterventionType, ReftConfig, FORMAT_VERSION};
use reft_core::{Error, ErrorKind};

/// Key, shape, dtype and bytes of a tensor to save.
type OwnedTensor = (String, Vec<usize>, DType, Vec<u8>);

fn intervention_json(name: &str, kind: InterventionType, dtype: &str) -> String {
    let rank = if kind.is_low_rank() { "3" } else { "null" };
    let positions = if kind.is_low_rank() { "f2+l2" } else { "all" };
    let extra = if kind == InterventionType::NoReft {
        r#", "projection_bias": true"#
    } else {
        ""
    };
    format!(
        r#"{{"name": "{name}", "type": "{kind}", "layer": 1, "component": "block_output", "positions": "{positions}",
            "low_rank_dimension": {rank}, "dtype": "{dtype}", "dropout": 0.05, "activation": "relu", "group": 0{extra}}}"#
    )
}

fn config_for(kinds: &[InterventionType], dtype: &str) -> ReftConfig {
    let items: Vec<String> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| intervention_json(&format!("i{i}_{k}"), *k, dtype))
        .collect();
    ReftConfig::from_json(
        &format!(
            r#"{{"base_model": {{"name_or_path": "tiny-llama", "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2}},
                "interventions": [{}], "metadata": {{"note": "test"}}}}"#,
            items.join(",")
        ),
        None,
    )
    .unwrap()
}

/// Deterministic bytes, including NaN and denormal patterns, for bit-exactness.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ 0x7f)
        .collect()
}

/// Every tensor the config calls for, filled with `pattern(seed)`.
fn tensors_for(config: &ReftConfig, seed: u8) -> Vec<OwnedTensor> {
    config
        .parameters()
        .unwrap()
        .into_iter()
        .map(|p| {
            let len = p.shape.iter().product::<usize>() * p.dtype.size();
            (p.key, p.shape, p.dtype, pattern(len, seed))
        })
        .collect()
}

/// Borrows owned tensors for saving.
fn refs(tensors: &[OwnedTensor]) -> Vec<(&str, TensorRef<'_>)> {
    tensors
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
        .collect()
}

fn save_all(dir: &Path, config: &ReftConfig, tensors: &[OwnedTensor]) -> reft_core::Result<()> {
    checkpoint::save(dir, config, &refs(tensors))
}

#[test]
fn every_type_and_dtype_round_trips_bit_exactly() {
    for dtype in ["float32", "float16", "bfloat16", "float64"] {
        let config = config_for(&InterventionType::ALL, dtype);
        let tensors = tensors_for(&config, 7);
        let dir = tempfile::tempdir().unwrap();
        save_all(dir.path(), &config, &tensors).unwrap();
        let loaded = checkpoint::load(dir.path()).unwrap();
        assert!(!loaded.recovered);
        assert_eq!(loaded.tensors.len(), tensors.len());
        for (key, shape, dtype, bytes) in &tensors {
            let tensor = &loaded.tensors[key];
            assert_eq!(&tensor.shape, shape);
            assert_eq!(tensor.dtype, *dtype);
            assert_eq!(&tensor.data, bytes, "{key}");
        }
        let mut expected = config.clone();
        expected.save_id = loaded.config.save_id.clone();
        assert_eq!(loaded.config, expected);
        assert!(!dir.path().join(checkpoint::PREVIOUS_TENSORS_FILE).exists());
    }
}

#[test]
fn a_save_cut_off_at_any_step_leaves_a_loadable_checkpoint() {
    let old_config = config_for(&[InterventionType::LoReft], "float32");
    let old_tensors = tensors_for(&old_config, 1);
    let new_config = config_for(
        &[InterventionType::LoReft, InterventionType::Red],
        "float32",
    );
    let new_tensors = tensors_for(&new_config, 2);
    for crash_after in [
        SaveStep::TemporariesWritten,
        SaveStep::PreviousKept,
        SaveStep::TensorsRenamed,
        SaveStep::ConfigRenamed,
    ] {
        let dir = tempfile::tempdir().unwrap();
        save_all(dir.path(), &old_config, &old_tensors).unwrap();
        let refs = refs(&new_tensors);
        let result = save_with_hook(dir.path(), &new_config, &refs, &mut |step| {
            if step == crash_after {
                Err(Error::Shape("simulated crash".into()))
            } else {
                Ok(())
            }
        });
        assert!(result.is_err());
        let loaded = checkpoint::load(dir.path()).unwrap();
        let (expect_config, expect_tensors) = if crash_after == SaveStep::ConfigRenamed {
            (&new_config, &new_tensors)
        } else {
            (&old_config, &old_tensors)
        };
        assert_eq!(
            loaded.config.interventions, expect_config.interventions,
            "crash after {crash_after:?}"
        );
        for (key, _, _, bytes) in expect_tensors {
            assert_eq!(
                &loaded.tensors[key].data, bytes,
                "crash after {crash_after:?}: {key}"
            );
        }
        assert_eq!(loaded.recovered, crash_after == SaveStep::TensorsRenamed);
        // the next save tidies up and wins
        save_all(dir.path(), &new_config, &new_tensors).unwrap();
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut names = names;
        names.sort();
        assert_eq!(
            names,
            vec![CONFIG_FILE.to_string(), TENSORS_FILE.to_string()]
        );
        assert_eq!(
            checkpoint::load(dir.path()).unwrap().config.interventions,
            new_config.interventions
        );
    }
}

#[test]
fn two_interrupted_saves_in_a_row_leave_a_loadable_checkpoint() {
    // Three saves of different configs and tensors: the first completes, the
    // next two are cut off at every pair of steps. The folder must load as
    // the last save that completed its config rename, tensors and all.
    let steps = [
        SaveStep::TemporariesWritten,
        SaveStep::PreviousKept,
        SaveStep::TensorsRenamed,
        SaveStep::ConfigRenamed,
    ];
    let kinds: [&[InterventionType]; 3] = [
        &[InterventionType::LoReft],
        &[InterventionType::LoReft, InterventionType::Red],
        &[InterventionType::Steer],
    ];
    let saves: Vec<(ReftConfig, Vec<OwnedTensor>)> = kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let config = config_for(k, "float32");
            let tensors = tensors_for(&config, i as u8 + 1);
            (config, tensors)
        })
        .collect();
    let crash_at = |step: SaveStep| {
        move |done: SaveStep| {
            if done == step {
                Err(Error::Shape("simulated crash".into()))
            } else {
                Ok(())
            }
        }
    };
    for first in steps {
        for second in steps {
            let dir = tempfile::tempdir().unwrap();
            save_all(dir.path(), &saves[0].0, &saves[0].1).unwrap();
            let mut expected = 0;
            for (save, step) in [(1, first), (2, second)] {
                let refs = refs(&saves[save].1);
                let result = save_with_hook(dir.path(), &saves[save].0, &refs, &mut crash_at(step));
                assert!(result.is_err());
                if step == SaveStep::ConfigRenamed {
                    expected = save;
                }
            }
            let label = format!("cut after {first:?}, then after {second:?}");
            let loaded = checkpoint::load(dir.path()).unwrap_or_else(|e| panic!("{label}: {e}"));
            assert_eq!(
                loaded.config.interventions, saves[expected].0.interventions,
                "{label}"
            );
            assert_eq!(loaded.tensors.len(), saves[expected].1.len(), "{label}");
            for (key, _, _, bytes) in &saves[expected].1 {
                assert_eq!(&loaded.tensors[key].data, bytes, "{label}: {key}");
            }
        }
    }
}

fn saved_checkpoint() -> (tempfile::TempDir, ReftConfig) {
    let config = config_for(
        &[InterventionType::LoReft, InterventionType::Steer],
        "float32",
    );
    let dir = tempfile::tempdir().unwrap();
    save_all(dir.path(), &config, &tensors_for(&config, 3)).unwrap();
    (dir, config)
}

fn load_error(dir: &Path) -> Error {
    checkpoint::load(dir).expect_err("load should fail")
}

#[test]
fn missing_folder_and_files_are_named() {
    let (dir, _) = saved_checkpoint();
    let gone = dir.path().join("nope");
    let err = load_error(&gone);
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(err.path(), Some(gone.as_path()));
    fs::remove_file(dir.path().join(TENSORS_FILE)).unwrap();
    let err = load_error(dir.path());
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert!(err.to_string().contains(TENSORS_FILE), "{err}");
    fs::remove_file(dir.path().join(CONFIG_FILE)).unwrap();
    assert!(load_error(dir.path()).to_string().contains(CONFIG_FILE));
}

#[test]
fn damaged_tensor_files_are_corrupt_checkpoints() {
    let (dir, _) = saved_checkpoint();
    let path = dir.path().join(TENSORS_FILE);
    let good = fs::read(&path).unwrap();
    for damaged in [
        good[..good.len() - 3].to_vec(),
        good[..5].to_vec(),
        b"not a safetensors file at all".to_vec(),
        Vec::new(),
    ] {
        fs::write(&path, &damaged).unwrap();
        let err = load_error(dir.path());
        assert_eq!(err.kind(), ErrorKind::CorruptCheckpoint, "{err}");
        assert_eq!(err.path(), Some(path.as_path()));
    }
}

#[test]
fn tensors_that_disagree_with_the_config_are_refused() {
    let (dir, config) = saved_checkpoint();
    // rewrite the tensor file, keeping the save_id, with one thing wrong each time
    let save_id = checkpoint::load(dir.path())
        .unwrap()
        .config
        .save_id
        .unwrap();
    let good = tensors_for(&config, 3);
    let mut cases: Vec<(Vec<OwnedTensor>, &str)> = Vec::new();
    cases.push((good[1..].to_vec(), "missing"));
    let mut wrong_shape = good.clone();
    wrong_shape[0].1 = vec![3, 4];
    wrong_shape[0].3 = pattern(3 * 4 * 4, 0);
    cases.push((wrong_shape, "shape"));
    let mut wrong_dtype = good.clone();
    wrong_dtype[0].2 = DType::Float64;
    wrong_dtype[0].3 = pattern(wrong_dtype[0].3.len() * 2, 0);
    cases.push((wrong_dtype, "float64"));
    let mut extra = good.clone();
    extra.push((
        "stray.weight".into(),
        vec![2],
        DType::Float32,
        pattern(8, 0),
    ));
    cases.push((extra, "stray.weight"));
    for (tensors, needle) in cases {
        let views = refs(&tensors);
        let metadata = std::collections::HashMap::from([("save_id".to_string(), save_id.clone())]);
        let bytes =
            safetensors::serialize(views.iter().map(|(k, v)| (*k, *v)), Some(metadata)).unwrap();
        fs::write(dir.path().join(TENSORS_FILE), bytes).unwrap();
        let err = load_error(dir.path());
        assert_eq!(err.kind(), ErrorKind::CorruptCheckpoint, "{needle}: {err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
}

#[test]
fn bad_configs_are_named() {
    let (dir, _) = saved_checkpoint();
    let path = dir.path().join(CONFIG_FILE);
    let good = fs::read_to_string(&path).unwrap();
    let current = format!("\"format_version\": {FORMAT_VERSION}");
    let cases = [
        (
            "{not json".to_string(),
            ErrorKind::InvalidCheckpoint,
            "not valid JSON",
        ),
        ("[1, 2]".to_string(), ErrorKind::InvalidCheckpoint, "object"),
        (
            good.replace("\"base_model\"", "\"base_modell\""),
            ErrorKind::InvalidCheckpoint,
            "base_modell",
        ),
        (
            good.replace(&current, "\"format_version\": 7"),
            ErrorKind::UnsupportedFormat,
            "7",
        ),
        (
            good.replace(&format!("{current},"), ""),
            ErrorKind::InvalidCheckpoint,
            "format_version",
        ),
        (
            good.replace("\"loreft\"", "\"superreft\""),
            ErrorKind::InvalidCheckpoint,
            "superreft",
        ),
        (
            good.replace("\"low_rank_dimension\": 3", "\"low_rank_dimension\": 4"),
            ErrorKind::CorruptCheckpoint,
            "shape",
        ),
    ];
    for (text, kind, needle) in cases {
        assert_ne!(text, good, "case {needle} did not change the config");
        fs::write(&path, &text).unwrap();
        let err = load_error(dir.path());
        assert_eq!(err.kind(), kind, "{needle}: {err}");
        assert!(err.to_string().contains(needle), "{needle}: {err}");
        assert!(
            err.to_string().contains(dir.path().to_str().unwrap()),
            "{err}"
        );
    }
    fs::write(&path, good.replace("\"loreft\"", "\"superreft\"")).unwrap();
    assert!(matches!(
        load_error(dir.path()),
        Error::UnknownInterventionType { .. }
    ));
}

#[test]
fn mixed_saves_without_a_previous_file_are_refused() {
    let (dir, config) = saved_checkpoint();
    let text = fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap();
    let other = tempfile::tempdir().unwrap();
    save_all(other.path(), &config, &tensors_for(&config, 9)).unwrap();
    fs::copy(
        other.path().join(TENSORS_FILE),
        dir.path().join(TENSORS_FILE),
    )
    .unwrap();
    let err = load_error(dir.path());
    assert_eq!(err.kind(), ErrorKind::CorruptCheckpoint);
    assert!(err.to_string().contains("different save"), "{err}");
    drop(text);
}

#[test]
fn save_refuses_bad_input_before_touching_files() {
    let (dir, config) = saved_checkpoint();
    let before = fs::read(dir.path().join(TENSORS_FILE)).unwrap();
    let mut tensors = tensors_for(&config, 4);
    tensors[0].3.pop(); // byte length no longer matches the shape
    let err = save_all(dir.path(), &config, &tensors).unwrap_err();
    assert!(matches!(err, Error::InvalidTensor { .. }), "{err}");
    let err = save_all(dir.path(), &config, &tensors_for(&config, 4)[1..]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidCheckpoint);
    assert!(err.to_string().contains("missing"), "{err}");
    assert_eq!(fs::read(dir.path().join(TENSORS_FILE)).unwrap(), before);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn extra_tensors_are_kept_when_declared() {
    let mut config = config_for(&[InterventionType::Red], "float32");
    config.extra_tensors = vec!["head.weight".into()];
    let mut tensors = tensors_for(&config, 5);
    tensors.push((
        "head.weight".into(),
        vec![2, 8],
        DType::Float32,
        pattern(64, 5),
    ));
    let dir = tempfile::tempdir().unwrap();
    save_all(dir.path(), &config, &tensors).unwrap();
    let loaded = checkpoint::load(dir.path()).unwrap();
    assert_eq!(loaded.tensors["head.weight"].data, pattern(64, 5));
}

#[test]
fn float_tensors_convert_to_f32() {
    let tensor = checkpoint::Tensor {
        dtype: DType::Bfloat16,
        shape: vec![2],
        data: vec![0x80, 0x3f, 0x00, 0xc0],
    };
    assert_eq!(tensor.to_f32().unwrap(), vec![1.0, -2.0]);
    let tensor = checkpoint::Tensor {
        dtype: DType::Float16,
        shape: vec![1],
        data: vec![0x00, 0x3c],
    };
    assert_eq!(tensor.to_f32().unwrap(), vec![1.0]);
    let tensor = checkpoint::Tensor {
        dtype: DType::Int64,
        shape: vec![1],
        data: vec![0; 8],
    };
    assert!(tensor.to_f32().is_none());
}

#[test]
fn format_1_checkpoints_load_with_the_last_token_included() {
    let (dir, _) = saved_checkpoint();
    let path = dir.path().join(CONFIG_FILE);
    let good = fs::read_to_string(&path).unwrap();
    let old = good
        .replace(
            &format!("\"format_version\": {FORMAT_VERSION}"),
            "\"format_version\": 1",
        )
        .replace(",\n      \"include_last\": true", "");
    assert!(!old.contains("include_last") && old.contains("\"format_version\": 1"));
    fs::write(&path, old).unwrap();
    let loaded = checkpoint::load(dir.path()).unwrap();
    assert_eq!(loaded.config.format_version, 1);
    assert!(loaded.config.interventions.iter().all(|i| i.include_last));
}
