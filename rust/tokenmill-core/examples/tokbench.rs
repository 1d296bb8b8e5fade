//! Profiling aid (best of 5): `cargo run --release --example tokbench -- VOCAB.tiktoken CORPUS.txt [PATTERN]`.
//! With TOKBENCH_QUICK set, only the corpus rows (no worst cases).
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
    let pattern = args.get(3).map_or("cl100k", String::as_str);
    let tok = Tokenizer::from_ranks(tiktoken::read(&args[1]).unwrap(), pattern, vec![]).unwrap();
    let text = std::fs::read_to_string(&args[2]).unwrap();
    let pre = Pretokenizer::new(pattern).unwrap();
    let mb = |n: usize, t: f64| n as f64 / t / 1e6;
    // TOKBENCH_ONLY=split|encode|none: run only that (for `perf stat -e cycles:u`, which counts
    // only the time on a core, unlike wall time on a shared box).
    let only = std::env::var("TOKBENCH_ONLY").ok();
    if let Some(o) = &only {
        match o.as_str() {
            "split" => println!("{}", pre.split(&text).count()),
            "encode" => println!("{}", tok.encode_ordinary(&text).len()),
            _ => {}
        }
        return;
    }
    let (t, n) = best(|| pre.split(&text).count());
    println!("prose split: {n} pieces {:.1} MB/s", mb(text.len(), t));
    let (t, ids) = best(|| tok.encode_ordinary(&text));
    println!(
        "prose encode: {} ids {:.1} MB/s",
        ids.len(),
        mb(text.len(), t)
    );
    if std::env::var_os("TOKBENCH_QUICK").is_some() {
        return;
    }
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
