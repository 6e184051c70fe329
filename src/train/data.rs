//! The training corpus: a weighted mixture of text sources, tokenized, separated by EOS,
//! with a fixed held-out slice per source that training never sees.

use crate::error::{Error, Result};
use crate::text::encode;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// One source of the mixture: a folder of `.txt` files (searched recursively).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    /// Name used in reports (the folder name by default).
    pub name: String,
    /// The folder.
    pub dir: PathBuf,
    /// Sampling weight (relative; default 1).
    pub weight: f64,
}

impl SourceSpec {
    /// Every sub-folder of `root` as a source of weight 1, sorted by name (the assets
    /// corpus: moby, sotu, email, pydoc, zh).
    ///
    /// Errors: [`Error::Io`] if `root` cannot be read; [`Error::Data`] if it has no
    /// sub-folder.
    pub fn folders_of(root: &Path) -> Result<Vec<SourceSpec>> {
        let mut specs = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            if entry.path().is_dir() {
                specs.push(SourceSpec {
                    name: entry.file_name().to_string_lossy().into_owned(),
                    dir: entry.path(),
                    weight: 1.0,
                });
            }
        }
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        if specs.is_empty() {
            return Err(Error::Data {
                source_name: root.display().to_string(),
                reason: "no source folders inside".to_string(),
            });
        }
        Ok(specs)
    }
}

/// How a corpus is read and split.
#[derive(Debug, Clone, PartialEq)]
pub struct CorpusOptions {
    /// Tokens per training / held-out row.
    pub seq_len: usize,
    /// Held-out rows per source, taken from the start of its token stream.
    pub heldout_rows: usize,
    /// Read files of a source (in seeded shuffled order) until this many characters.
    pub max_chars_per_source: usize,
    /// Seed of the file order.
    pub seed: u64,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        Self {
            seq_len: 256,
            heldout_rows: 4,
            max_chars_per_source: 600_000,
            seed: 1,
        }
    }
}

/// A tokenized source: its held-out rows and its training stream.
#[derive(Debug, Clone)]
pub struct TokenizedSource {
    /// The source's name.
    pub name: String,
    /// Sampling weight.
    pub weight: f64,
    /// `heldout_rows` rows of `seq_len` tokens each.
    pub heldout: Vec<Vec<u32>>,
    /// Everything after the held-out slice.
    pub train: Vec<u32>,
}

/// The tokenized mixture.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Sources in the order given.
    pub sources: Vec<TokenizedSource>,
    seq_len: usize,
}

impl Corpus {
    /// What identifies the corpus to a resumed run: the row length and, per source, its
    /// name, weight, token counts and an FNV-1a hash of its tokens. Two corpora with the
    /// same fingerprint give the same batches for the same seed and step.
    pub fn fingerprint(&self) -> serde_json::Value {
        let hash = |tokens: &mut dyn Iterator<Item = u32>| -> String {
            let h = tokens.fold(0xcbf2_9ce4_8422_2325u64, |h, t| {
                t.to_le_bytes()
                    .iter()
                    .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
            });
            format!("{h:016x}")
        };
        let sources: Vec<serde_json::Value> = self
            .sources
            .iter()
            .map(|s| {
                let mut tokens = s.heldout.iter().flatten().chain(&s.train).copied();
                serde_json::json!({
                    "name": s.name,
                    "weight": s.weight,
                    "heldout_tokens": s.heldout.iter().map(Vec::len).sum::<usize>(),
                    "train_tokens": s.train.len(),
                    "hash": hash(&mut tokens),
                })
            })
            .collect();
        serde_json::json!({ "seq_len": self.seq_len, "sources": sources })
    }

    /// Reads and tokenizes every source: files sorted by path then shuffled with `seed`,
    /// each tokenized without BOS and followed by `eos`, until `max_chars_per_source`
    /// characters. The first `heldout_rows · seq_len` tokens are held out.
    ///
    /// Errors: [`Error::Data`] naming a source that is missing, unreadable, has no `.txt`
    /// file, or has too few tokens for the held-out slice plus one training row;
    /// [`Error::InvalidArgument`] for no sources, a non-positive weight or `seq_len < 2`.
    pub fn load(
        specs: &[SourceSpec],
        tokenizer: &Tokenizer,
        eos: u32,
        opts: &CorpusOptions,
    ) -> Result<Self> {
        if specs.is_empty() {
            return Err(Error::InvalidArgument(
                "the corpus has no sources".to_string(),
            ));
        }
        if opts.seq_len < 2 {
            return Err(Error::InvalidArgument(
                "seq_len must be at least 2".to_string(),
            ));
        }
        let mut sources = Vec::with_capacity(specs.len());
        for spec in specs {
            let bad = |reason: String| Error::Data {
                source_name: spec.name.clone(),
                reason,
            };
            if !(spec.weight > 0.0 && spec.weight.is_finite()) {
                return Err(Error::InvalidArgument(format!(
                    "source `{}` has weight {}; weights must be positive",
                    spec.name, spec.weight
                )));
            }
            let mut files = Vec::new();
            collect_txt(&spec.dir, &mut files)
                .map_err(|e| bad(format!("{}: {e}", spec.dir.display())))?;
            files.sort();
            files.shuffle(&mut StdRng::seed_from_u64(opts.seed));
            let mut ids = Vec::new();
            let mut chars = 0usize;
            for f in &files {
                let bytes = std::fs::read(f).map_err(|e| bad(format!("{}: {e}", f.display())))?;
                let text = String::from_utf8_lossy(&bytes);
                if text.trim().is_empty() {
                    continue;
                }
                ids.extend(encode(tokenizer, &text)?);
                ids.push(eos);
                chars += text.chars().count();
                if chars > opts.max_chars_per_source {
                    break;
                }
            }
            if files.is_empty() || ids.is_empty() {
                return Err(bad(format!(
                    "no text in {} (.txt files)",
                    spec.dir.display()
                )));
            }
            let held = opts.heldout_rows * opts.seq_len;
            if ids.len() < held + opts.seq_len + 1 {
                return Err(bad(format!(
                    "{} tokens, fewer than the {} needed for {} held-out rows and one training row",
                    ids.len(),
                    held + opts.seq_len + 1,
                    opts.heldout_rows
                )));
            }
            let train = ids.split_off(held);
            let heldout = ids.chunks(opts.seq_len).map(<[u32]>::to_vec).collect();
            sources.push(TokenizedSource {
                name: spec.name.clone(),
                weight: spec.weight,
                heldout,
                train,
            });
        }
        Ok(Self {
            sources,
            seq_len: opts.seq_len,
        })
    }

    /// Calibration rows: `per_source` windows of `seq_len` tokens spread evenly over every
    /// source's training split (never its held-out rows), in source order. Evenly spread,
    /// not the first windows: the start of a source (front matter, a first document) is
    /// not typical of it.
    pub fn calibration_rows(&self, per_source: usize) -> Vec<Vec<u32>> {
        let t = self.seq_len;
        self.sources
            .iter()
            .flat_map(|s| {
                let span = s.train.len().saturating_sub(t);
                (0..per_source).map(move |k| {
                    let start = span * (2 * k + 1) / (2 * per_source.max(1));
                    s.train[start..start + t].to_vec()
                })
            })
            .collect()
    }

    /// Tokens per row.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// The training rows of micro-batch `micro` of step `step`: `batch_size` windows of
    /// `seq_len` tokens, each from a source drawn by weight at a uniform offset. A pure
    /// function of `(seed, step, micro)`, so a resumed run sees the same data.
    pub fn train_batch(
        &self,
        seed: u64,
        step: usize,
        micro: usize,
        batch_size: usize,
    ) -> Vec<Vec<u32>> {
        let mix = seed
            ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (micro as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        let mut rng = StdRng::seed_from_u64(mix);
        let total: f64 = self.sources.iter().map(|s| s.weight).sum();
        (0..batch_size)
            .map(|_| {
                let mut pick = rng.random::<f64>() * total;
                let source = self
                    .sources
                    .iter()
                    .find(|s| {
                        pick -= s.weight;
                        pick < 0.0
                    })
                    .unwrap_or(&self.sources[self.sources.len() - 1]);
                let start = rng.random_range(0..source.train.len() - self.seq_len);
                source.train[start..start + self.seq_len].to_vec()
            })
            .collect()
    }
}

fn collect_txt(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_txt(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "txt") {
            out.push(path);
        }
    }
    Ok(())
}
