//! What a model is made of beyond its block stack's size: the vocabulary and its head, the
//! MLP and norm kinds, grouped-query attention, biases, and the published models as presets.
//!
//! [`Arch::GPT`] is the block stack headroom started with (LayerNorm, GELU MLP of 4·C,
//! biases everywhere, as many K/V heads as query heads) with no vocabulary: its loss is
//! ½·Σy²/numel on the last hidden state. A vocabulary adds the token embedding (and learned
//! positions where the model has them), the final norm, the LM head (tied to the embedding or
//! not) and cross-entropy over the vocabulary.

use crate::error::{Error, Result};
use crate::model::ModelShape;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mlp {
    /// fc (C → F), GELU (tanh approximation), fc2 (F → C): GPT-2.
    Gelu,
    /// gate and up (C → F each), silu(gate)·up, down (F → C): Llama (Shazeer 2020).
    SwiGlu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Norm {
    /// Mean and variance, weight and bias (Ba et al. 2016).
    LayerNorm,
    /// Root mean square, weight only (Zhang & Sennrich 2019).
    RmsNorm,
}

/// Which linear layers carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bias {
    /// Every linear layer (GPT-2).
    All,
    /// Only the q, k and v projections (Qwen2).
    Qkv,
    /// None (Llama, Mistral).
    None,
}

/// The architecture of a [`ModelShape`]'s model. Zero in `kv_heads` or `ffn` means the
/// default of the shape (as many K/V heads as heads; 4·hidden).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Arch {
    pub kv_heads: usize,
    pub ffn: usize,
    /// Vocabulary size; 0: no vocabulary, the loss is on the last hidden state.
    pub vocab: usize,
    pub mlp: Mlp,
    pub norm: Norm,
    pub bias: Bias,
    /// The LM head is the token embedding's table.
    pub tied: bool,
    /// Rows of a learned position table (GPT-2's 1024); 0: none (rotary positions have no
    /// parameters, and their cost is not modeled).
    pub positions: usize,
}

impl Arch {
    /// headroom's original block stack, with no vocabulary.
    pub const GPT: Arch = Arch {
        kv_heads: 0,
        ffn: 0,
        vocab: 0,
        mlp: Mlp::Gelu,
        norm: Norm::LayerNorm,
        bias: Bias::All,
        tied: false,
        positions: 0,
    };

    /// The suffix this architecture adds to a shape's name (empty for [`Arch::GPT`]), in
    /// the order [`parse_arch_token`] reads it back.
    pub fn suffix(&self) -> String {
        let mut s = String::new();
        if self.kv_heads != 0 {
            s += &format!("-kv{}", self.kv_heads);
        }
        if self.ffn != 0 {
            s += &format!("-ffn{}", self.ffn);
        }
        if self.mlp == Mlp::SwiGlu {
            s += "-swiglu";
        }
        if self.norm == Norm::RmsNorm {
            s += "-rms";
        }
        match self.bias {
            Bias::All => {}
            Bias::Qkv => s += "-qkvbias",
            Bias::None => s += "-nobias",
        }
        if self.vocab != 0 {
            s += &format!("-v{}", self.vocab);
            if self.tied {
                s += "-tied";
            }
            if self.positions != 0 {
                s += &format!("-pos{}", self.positions);
            }
        }
        s
    }
}

/// Reads one `-`-separated token of a shape's name into `arch`; false when it is not an
/// architecture token.
pub fn parse_arch_token(arch: &mut Arch, token: &str) -> bool {
    let number = |prefix: &str| -> Option<usize> {
        token
            .strip_prefix(prefix)
            .filter(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|r| r.parse().ok())
    };
    match token {
        "swiglu" => arch.mlp = Mlp::SwiGlu,
        "rms" => arch.norm = Norm::RmsNorm,
        "qkvbias" => arch.bias = Bias::Qkv,
        "nobias" => arch.bias = Bias::None,
        "tied" => arch.tied = true,
        _ => {
            if let Some(n) = number("kv") {
                arch.kv_heads = n;
            } else if let Some(n) = number("ffn") {
                arch.ffn = n;
            } else if let Some(n) = number("pos") {
                arch.positions = n;
            } else if let Some(n) = number("v") {
                arch.vocab = n;
            } else {
                return false;
            }
        }
    }
    true
}

/// A published model: its architecture and its size, and the parameter count its authors
/// give, which [`ModelShape::params`] must reproduce to 0.1%.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub name: &'static str,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub arch: Arch,
    /// The figure the model card states.
    pub published_params: u64,
    /// Where that figure and the configuration come from.
    pub source: &'static str,
}

const LLAMA: Arch = Arch {
    kv_heads: 0,
    ffn: 0,
    vocab: 0,
    mlp: Mlp::SwiGlu,
    norm: Norm::RmsNorm,
    bias: Bias::None,
    tied: false,
    positions: 0,
};

/// The presets `plan --model` and training cases know.
pub const PRESETS: [Preset; 5] = [
    Preset {
        name: "gpt2-small",
        layers: 12,
        hidden: 768,
        heads: 12,
        arch: Arch {
            vocab: 50257,
            tied: true,
            positions: 1024,
            ..Arch::GPT
        },
        published_params: 124_439_808,
        source: "openai-community/gpt2 config.json (n_layer 12, n_embd 768, n_head 12, vocab 50257, n_positions 1024); 124M, counted 124,439,808 by transformers",
    },
    Preset {
        name: "llama2-7b",
        layers: 32,
        hidden: 4096,
        heads: 32,
        arch: Arch {
            ffn: 11008,
            vocab: 32000,
            ..LLAMA
        },
        published_params: 6_738_415_616,
        source: "meta-llama/Llama-2-7b-hf config.json (intermediate 11008, vocab 32000); 6.74B (Touvron et al. 2023, table 1: 7B)",
    },
    Preset {
        name: "llama3-8b",
        layers: 32,
        hidden: 4096,
        heads: 32,
        arch: Arch {
            kv_heads: 8,
            ffn: 14336,
            vocab: 128256,
            ..LLAMA
        },
        published_params: 8_030_261_248,
        source: "meta-llama/Meta-Llama-3-8B config.json (8 K/V heads, intermediate 14336, vocab 128256); 8.03B",
    },
    Preset {
        name: "mistral-7b",
        layers: 32,
        hidden: 4096,
        heads: 32,
        arch: Arch {
            kv_heads: 8,
            ffn: 14336,
            vocab: 32000,
            ..LLAMA
        },
        published_params: 7_241_732_096,
        source: "mistralai/Mistral-7B-v0.1 config.json (8 K/V heads, intermediate 14336, vocab 32000); 7.24B",
    },
    Preset {
        name: "qwen2.5-7b",
        layers: 28,
        hidden: 3584,
        heads: 28,
        arch: Arch {
            kv_heads: 4,
            ffn: 18944,
            vocab: 152064,
            bias: Bias::Qkv,
            ..LLAMA
        },
        published_params: 7_615_616_512,
        source: "Qwen/Qwen2.5-7B config.json (4 K/V heads, intermediate 18944, vocab 152064, q/k/v biases); 7.61B, 6.53B without embeddings",
    },
];

impl Preset {
    /// The preset by name, or a sentence listing the names there are.
    pub fn find(name: &str) -> Result<&'static Preset> {
        PRESETS
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
                Error::Invalid(format!(
                    "no model preset '{name}': the presets are {}",
                    names.join(", ")
                ))
            })
    }

    /// The preset at a sequence length and batch, before any check: the base a user's own
    /// changes (a longer position table, another vocabulary) start from.
    pub fn unchecked_shape(&self, seq: usize, batch: usize) -> ModelShape {
        ModelShape {
            layers: self.layers,
            hidden: self.hidden,
            heads: self.heads,
            seq,
            batch,
            arch: self.arch,
        }
    }

    /// The preset at a sequence length and batch, with its parameter count checked against
    /// the published one. A learned position table bounds the sequence.
    pub fn shape(&self, seq: usize, batch: usize) -> Result<ModelShape> {
        let shape = self.unchecked_shape(seq, batch);
        shape.check()?;
        let counted = shape.params() as f64;
        let published = self.published_params as f64;
        if (counted - published).abs() > 1e-3 * published {
            return Err(Error::Invalid(format!(
                "preset {}: counts {counted} parameters against the published {published}; refused until its shape is corrected",
                self.name
            )));
        }
        Ok(shape)
    }
}
