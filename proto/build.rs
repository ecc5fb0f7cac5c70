//! Compiles `proto/**/*.proto` with protox (a protobuf compiler in Rust) and hands the
//! descriptors to tonic's generator, so building needs no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/grok/peer/v1/peer.proto",
        "proto/grok/worker/v1/worker.proto",
    ];
    // The whole folder, so files imported later are watched too.
    println!("cargo:rerun-if-changed=proto");
    // What a worker tells the coordinator it speaks: two builds agree only if their .proto
    // files are the same bytes (FNV-1a, 64 bits: a fingerprint, not a defence).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        for b in f.bytes().chain(std::fs::read(f)?) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=GROK_PROTO_FINGERPRINT={hash:016x}");
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Tensor payloads as `Bytes`: decoding slices the receive buffer instead of copying.
        .bytes(".grok.peer.v1.TensorChunk.payload")
        .bytes(".grok.worker.v1.SeqLogits.logits_f32")
        .compile_fds(fds)?;
    Ok(())
}
