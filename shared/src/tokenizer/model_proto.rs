//! Hand-written `prost` mirror of SentencePiece's `sentencepiece_model.proto` (proto2).
//!
//! Only the fields the runtime tokenizer (or a reader of the model's settings) needs are
//! declared; prost skips the rest (training inputs, self-test data, ...) as unknown fields.
//! Field numbers and defaults follow the upstream `.proto`; writing them by hand keeps the
//! build free of `protoc` and build scripts.

/// `ModelProto`: the whole `tokenizer.model` file.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    /// The vocabulary; a piece's id is its index.
    #[prost(message, repeated, tag = "1")]
    pub pieces: Vec<SentencePiece>,
    #[prost(message, optional, tag = "2")]
    pub trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    pub normalizer_spec: Option<NormalizerSpec>,
    /// Applied to decoded text when present (rare; absent in Grok-1's model).
    #[prost(message, optional, tag = "5")]
    pub denormalizer_spec: Option<NormalizerSpec>,
}

/// `ModelProto.SentencePiece`: one vocabulary entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    pub piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    pub score: Option<f32>,
    #[prost(enumeration = "PieceType", optional, tag = "3", default = "Normal")]
    pub r#type: Option<i32>,
}

/// `ModelProto.SentencePiece.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PieceType {
    /// Ordinary piece, produced by BPE merges.
    Normal = 1,
    /// The `<unk>` piece.
    Unknown = 2,
    /// Control symbols such as `<s>`; never produced from text, decoded as nothing.
    Control = 3,
    /// Symbols matched verbatim in the input and never merged further.
    UserDefined = 4,
    /// Pieces kept in the vocabulary but re-split into their parts when encoding.
    Unused = 5,
    /// Byte-fallback pieces `<0xXX>`.
    Byte = 6,
}

/// `TrainerSpec`. Most fields only describe training; the runtime uses `model_type`,
/// `byte_fallback`, `treat_whitespace_as_suffix`, the special ids and `unk_surface`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TrainerSpec {
    #[prost(enumeration = "ModelType", optional, tag = "3", default = "Unigram")]
    pub model_type: Option<i32>,
    #[prost(int32, optional, tag = "4", default = "8000")]
    pub vocab_size: Option<i32>,
    #[prost(int32, optional, tag = "20", default = "16")]
    pub max_sentencepiece_length: Option<i32>,
    #[prost(bool, optional, tag = "21", default = "true")]
    pub split_by_unicode_script: Option<bool>,
    #[prost(bool, optional, tag = "22", default = "true")]
    pub split_by_whitespace: Option<bool>,
    #[prost(bool, optional, tag = "23", default = "true")]
    pub split_by_number: Option<bool>,
    #[prost(bool, optional, tag = "24", default = "false")]
    pub treat_whitespace_as_suffix: Option<bool>,
    #[prost(bool, optional, tag = "25", default = "false")]
    pub split_digits: Option<bool>,
    #[prost(bool, optional, tag = "26", default = "false")]
    pub allow_whitespace_only_pieces: Option<bool>,
    #[prost(string, repeated, tag = "30")]
    pub control_symbols: Vec<String>,
    #[prost(string, repeated, tag = "31")]
    pub user_defined_symbols: Vec<String>,
    #[prost(bool, optional, tag = "35", default = "false")]
    pub byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40", default = "0")]
    pub unk_id: Option<i32>,
    #[prost(int32, optional, tag = "41", default = "1")]
    pub bos_id: Option<i32>,
    #[prost(int32, optional, tag = "42", default = "2")]
    pub eos_id: Option<i32>,
    #[prost(int32, optional, tag = "43", default = "-1")]
    pub pad_id: Option<i32>,
    #[prost(string, optional, tag = "44", default = " \u{2047} ")]
    pub unk_surface: Option<String>,
    #[prost(string, optional, tag = "45", default = "<unk>")]
    pub unk_piece: Option<String>,
    #[prost(string, optional, tag = "46", default = "<s>")]
    pub bos_piece: Option<String>,
    #[prost(string, optional, tag = "47", default = "</s>")]
    pub eos_piece: Option<String>,
    #[prost(string, optional, tag = "48", default = "<pad>")]
    pub pad_piece: Option<String>,
    #[prost(string, optional, tag = "53", default = "")]
    pub pretokenization_delimiter: Option<String>,
}

/// `TrainerSpec.ModelType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ModelType {
    Unigram = 1,
    Bpe = 2,
    Word = 3,
    Char = 4,
}

/// `NormalizerSpec`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct NormalizerSpec {
    /// Informational only: the runtime behaviour is fully given by `precompiled_charsmap`.
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    /// Darts trie + replacement table for NFKC-like rules; empty means identity.
    #[prost(bytes = "vec", optional, tag = "2")]
    pub precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3", default = "true")]
    pub add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4", default = "true")]
    pub remove_extra_whitespaces: Option<bool>,
    #[prost(bool, optional, tag = "5", default = "true")]
    pub escape_whitespaces: Option<bool>,
}
