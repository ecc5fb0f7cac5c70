//! Compiles `proto/**/*.proto` with protox (a protobuf compiler in Rust) and hands the
//! descriptors to tonic's generator, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/grok/peer/v1/peer.proto",
        "proto/grok/worker/v1/worker.proto",
    ];
    // The whole folder, so files imported later are watched too.
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Tensor payloads as `Bytes`: decoding slices the receive buffer instead of copying.
        .bytes(".grok.peer.v1.TensorChunk.payload")
        .bytes(".grok.worker.v1.SeqLogits.logits_f32")
        .compile_fds(fds)?;
    Ok(())
}
