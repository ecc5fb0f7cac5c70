//! Tokenizer (to be written).
