pub mod batch;
pub mod bench;
pub mod convert;
pub mod generate;
pub mod init;
pub mod logits;
pub mod serve;
pub mod tokenize;
