//! Profiling aid (best of 5): `cargo run --release --example tokbench -- VOCAB.tiktoken CORPUS.txt`.
use std::time::Instant;
use tokenmill_core::bpe::Tokenizer;
use tokenmill_core::formats::tiktoken;
use tokenmill_core::pretokenize::Pretokenizer;

fn best<T>(f: impl Fn() -> T) -> (f64, T) {
    let mut best = f64::MAX;
    let mut out = None;
    for _ in 0..5 {
        let t = Instant::now();
        out = Some(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, out.unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tok = Tokenizer::from_ranks(tiktoken::read(&args[1]).unwrap(), "cl100k", vec![]).unwrap();
    let text = std::fs::read_to_string(&args[2]).unwrap();
    let pre = Pretokenizer::new("cl100k").unwrap();
    let mb = |n: usize, t: f64| n as f64 / t / 1e6;
    let (t, n) = best(|| pre.split(&text).count());
    println!("prose split: {n} pieces {:.1} MB/s", mb(text.len(), t));
    let (t, ids) = best(|| tok.encode_ordinary(&text));
    println!(
        "prose encode: {} ids {:.1} MB/s",
        ids.len(),
        mb(text.len(), t)
    );
    // xorshift64: uniform random letters like the Python bench (a multiplicative hash repeats).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let letters: String = (0..1u32 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (b'a' + (x % 26) as u8) as char
        })
        .collect();
    for (name, s) in [
        ("1 MiB a-run", "a".repeat(1 << 20)),
        ("1 MiB letters", letters),
    ] {
        let (t, ids) = best(|| tok.encode_ordinary(&s));
        println!("{name}: {} ids {:.1} MB/s", ids.len(), mb(s.len(), t));
    }
}
