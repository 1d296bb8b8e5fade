use super::*;
use crate::pretokenize::Pretokenizer;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// The slow, obviously-right trainer: recount every pair at every step.
fn reference(words: &BTreeMap<Vec<u8>, u64>, num_tokens: usize, min_frequency: u64) -> Trained {
    let mut ws: Vec<(Vec<u32>, u64)> = words
        .iter()
        .map(|(w, &c)| (w.iter().map(|&b| u32::from(b)).collect(), c))
        .collect();
    let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let mut merges = Vec::new();
    while tokens.len() - 256 < num_tokens {
        let mut counts: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for (w, c) in &ws {
            for p in w.windows(2) {
                *counts.entry((p[0], p[1])).or_default() += c;
            }
        }
        // Max count, then the smallest pair (BTreeMap iterates pairs in ascending order).
        let Some((&(a, b), &count)) =
            counts
                .iter()
                .fold(None, |best: Option<(&(u32, u32), &u64)>, kv| match best {
                    Some(bk) if bk.1 >= kv.1 => Some(bk),
                    _ => Some(kv),
                })
        else {
            break;
        };
        if count < min_frequency {
            break;
        }
        let bytes = [tokens[a as usize].clone(), tokens[b as usize].clone()].concat();
        let id = match tokens.iter().position(|t| *t == bytes) {
            Some(i) => i as u32,
            None => {
                tokens.push(bytes);
                tokens.len() as u32 - 1
            }
        };
        merges.push(Merge {
            left: a,
            right: b,
            id,
            count,
        });
        for (w, _) in ws.iter_mut() {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && w[i] == a && w[i + 1] == b {
                    out.push(id);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
    Trained { tokens, merges }
}

fn fast(words: &BTreeMap<Vec<u8>, u64>, num_tokens: usize, min_frequency: u64) -> Trained {
    train_words(
        words.iter().map(|(w, &c)| (w.as_slice(), c)),
        num_tokens,
        min_frequency,
        &mut |_| {},
    )
}

const PATTERNS: [&str; 4] = ["gpt2", "cl100k", "o200k", "llama3"];

/// Compiled once: the large Unicode classes make compiling slower than a test case.
fn pretokenizer(pattern: &str) -> &'static Pretokenizer {
    static CACHE: std::sync::OnceLock<Vec<Pretokenizer>> = std::sync::OnceLock::new();
    let all = CACHE.get_or_init(|| {
        PATTERNS
            .iter()
            .map(|p| Pretokenizer::new(p).unwrap())
            .collect()
    });
    &all[PATTERNS.iter().position(|p| *p == pattern).unwrap()]
}

fn count_texts(
    pattern: &str,
    specials: &[&str],
    texts: &[String],
    block: usize,
) -> BTreeMap<String, u64> {
    let pre = pretokenizer(pattern);
    let specials: Vec<String> = specials.iter().map(|s| s.to_string()).collect();
    let mut c = WordCounter::new(pre, &specials)
        .unwrap()
        .with_block_size(block);
    c.add_texts(texts);
    c.into_counts()
        .into_iter()
        .map(|(k, v)| (k.into(), v))
        .collect()
}

/// Whole-text pieces, no blocks, specials cut out by hand.
fn count_plain(pattern: &str, specials: &[&str], texts: &[String]) -> BTreeMap<String, u64> {
    let pre = pretokenizer(pattern);
    let mut out = BTreeMap::new();
    for t in texts {
        let mut segs = vec![t.as_str()];
        let mut sorted = specials.to_vec();
        sorted.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for sp in sorted {
            segs = segs.iter().flat_map(|s| s.split(sp)).collect();
        }
        for s in segs {
            for p in pre.split(s) {
                *out.entry(p.to_string()).or_default() += 1;
            }
        }
    }
    out
}

#[test]
fn hand_checked_merges() {
    // "aaab" x2 and "ab" x3: pairs (a,a) 4, (a,b) 5 -> merge (a,b) first.
    let words: BTreeMap<Vec<u8>, u64> = [(b"aaab".to_vec(), 2), (b"ab".to_vec(), 3)].into();
    let t = fast(&words, 3, 1);
    let m: Vec<(u32, u32, u32, u64)> = t
        .merges
        .iter()
        .map(|m| (m.left, m.right, m.id, m.count))
        .collect();
    // Then "a a ab" x2: (a,a) 2, (a,ab) 2 -> tie, smaller pair (97, 97) wins; then (aa, ab) 2.
    assert_eq!(
        m,
        vec![(97, 98, 256, 5), (97, 97, 257, 2), (257, 256, 258, 2)]
    );
    assert_eq!(t.tokens[258], b"aaab");
    assert_eq!(t, reference(&words, 3, 1));
}

#[test]
fn overlapping_pairs_count_windows() {
    // "aaaa": windows (a,a) x3, merged greedily into "aa aa"; then (aa, aa).
    let words: BTreeMap<Vec<u8>, u64> = [(b"aaaa".to_vec(), 1)].into();
    let t = fast(&words, 5, 1);
    assert_eq!(t.tokens[256..], [b"aa".to_vec(), b"aaaa".to_vec()]);
    assert_eq!(t.merges[0].count, 3);
    assert_eq!(t.merges[1].count, 1);
}

#[test]
fn counts_beyond_32_bits() {
    let big = 3u64 << 40;
    let words: BTreeMap<Vec<u8>, u64> = [(b"ab".to_vec(), big), (b"abc".to_vec(), big)].into();
    let t = fast(&words, 2, 1);
    assert_eq!(t.merges[0].count, 2 * big);
    assert_eq!(t.merges[1].count, big);
    assert_eq!(t, reference(&words, 2, 1));
}

#[test]
fn min_frequency_stops() {
    let words: BTreeMap<Vec<u8>, u64> = [(b"xy".to_vec(), 3), (b"zw".to_vec(), 1)].into();
    assert_eq!(fast(&words, 10, 2).tokens.len(), 257);
    assert_eq!(fast(&words, 10, 1).tokens.len(), 258);
    assert_eq!(fast(&words, 10, 4).tokens.len(), 256);
}

#[test]
fn blocks_do_not_change_pieces() {
    let text = "def f(x):\n    return x  \n\n  \nclass A:\n  pass\n\t\n#x\n'll go\n<|e|>z\n<|e|>\nq<|e|>\n!!\n/x:\n//\nHTTPServer's\n".repeat(7);
    let texts = vec![text];
    for pattern in PATTERNS {
        for specials in [&[][..], &["<|e|>"][..]] {
            let want = count_plain(pattern, specials, &texts);
            for block in [1, 2, 3, 5, 8, 13, 40, 1000] {
                assert_eq!(
                    count_texts(pattern, specials, &texts, block),
                    want,
                    "{pattern} {specials:?} {block}"
                );
            }
        }
    }
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenmill-train-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn files_equal_texts() {
    let d = tmpdir("files");
    let texts: Vec<String> = (0..5)
        .map(|i| format!("fn x{i}() {{\n  return {i}  \n}}\n\nwörd ünï {i}\n").repeat(30 * i + 1))
        .collect();
    let mut paths = Vec::new();
    for (i, t) in texts.iter().enumerate() {
        let p = d.join(format!("{i}.txt"));
        std::fs::write(&p, t).unwrap();
        paths.push(p);
    }
    let pre = pretokenizer("cl100k");
    for block in [1, 7, 64, BLOCK] {
        let mut c = WordCounter::new(pre, &["wörd".to_string()])
            .unwrap()
            .with_block_size(block);
        c.add_files(&paths, &mut Progress::new("", "", None, false))
            .unwrap();
        assert_eq!(c.bytes(), texts.iter().map(|t| t.len() as u64).sum::<u64>());
        let got: BTreeMap<String, u64> = c
            .into_counts()
            .into_iter()
            .map(|(k, v)| (k.into(), v))
            .collect();
        assert_eq!(
            got,
            count_plain("cl100k", &["wörd"], &texts),
            "block {block}"
        );
    }
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn file_errors_name_the_file() {
    let d = tmpdir("errors");
    let pre = pretokenizer("cl100k");
    let mut bar = Progress::new("", "", None, false);
    let missing = d.join("missing.txt");
    let mut c = WordCounter::new(pre, &[]).unwrap();
    let e = c
        .add_files(std::slice::from_ref(&missing), &mut bar)
        .unwrap_err();
    assert!(
        matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    );
    assert!(e.to_string().contains("missing.txt"));

    let bad = d.join("bad.txt");
    let mut bytes = b"hello\nworld\n".repeat(10);
    bytes.extend_from_slice(&[b'x', 0xff, b'y']);
    std::fs::write(&bad, &bytes).unwrap();
    for block in [1, 5, BLOCK] {
        let mut c = WordCounter::new(pre, &[]).unwrap().with_block_size(block);
        let e = c
            .add_files(std::slice::from_ref(&bad), &mut bar)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("bad.txt") && e.contains("byte offset 121"),
            "{e}"
        );
    }
    let truncated = d.join("truncated.txt");
    std::fs::write(&truncated, "ok é".as_bytes().split_last().unwrap().1).unwrap();
    let e = c.add_files(&[truncated], &mut bar).unwrap_err().to_string();
    assert!(
        e.contains("truncated.txt") && e.contains("byte offset 3"),
        "{e}"
    );
    let e = c
        .add_files(std::slice::from_ref(&d), &mut bar)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a directory"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn vocab_size_counts_specials() {
    let opts = TrainOptions {
        vocab_size: 258,
        special_tokens: vec!["<a>".into(), "<b>".into()],
        min_frequency: 1,
        show_progress: false,
    };
    assert_eq!(opts.num_merges().unwrap(), 0);
    let opts = TrainOptions {
        vocab_size: 257,
        ..opts
    };
    assert!(opts
        .num_merges()
        .unwrap_err()
        .to_string()
        .contains("vocab_size 257"));
}

#[test]
fn same_result_whatever_the_thread_count() {
    let texts: Vec<String> = (0..200)
        .map(|i| {
            format!("item {i} of the list: {}\n", "abc def ghi ".repeat(i % 7)).repeat(1 + i % 5)
        })
        .collect();
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let pre = pretokenizer("cl100k");
            let mut c = WordCounter::new(pre, &[]).unwrap().with_block_size(64);
            c.add_texts(&texts);
            let opts = TrainOptions {
                vocab_size: 600,
                special_tokens: vec![],
                min_frequency: 2,
                show_progress: false,
            };
            train_counts(c.into_counts(), &opts).unwrap()
        })
    };
    let one = run(1);
    assert!(one.tokens.len() > 300);
    assert_eq!(one, run(3));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every merge is the most frequent pair of its step, smallest pair first among ties.
    #[test]
    fn matches_the_reference(
        words in proptest::collection::btree_map(
            proptest::collection::vec(prop_oneof![Just(b'a'), Just(b'b'), Just(b'c'), any::<u8>()], 1..12),
            1u64..20,
            1..30,
        ),
        n in 0usize..40,
        min_frequency in 0u64..4,
    ) {
        prop_assert_eq!(fast(&words, n, min_frequency), reference(&words, n, min_frequency));
    }

    /// Cutting texts into blocks never changes the counted pieces.
    #[test]
    fn blocks_are_invisible(
        text in "([a-cA-C]{1,4}|[ \t]{1,3}|\n|\r|[!.:/]|<s>|[0-9]{1,5}|é|'s|'T)*",
        block in 1usize..50,
    ) {
        let texts = vec![text];
        for pattern in PATTERNS {
            prop_assert_eq!(
                count_texts(pattern, &["<s>"], &texts, block),
                count_plain(pattern, &["<s>"], &texts)
            );
        }
    }
}

#[test]
fn dropped_bytes_are_counted_once_whatever_the_block_size() {
    // `\p{L}+` leaves the spaces, digits and newlines: count them by hand.
    let texts: Vec<String> = (0..50)
        .map(|i| format!("word {i} and more<s>x\n").repeat(1 + i % 4))
        .collect();
    let want: u64 = texts
        .iter()
        .map(|t| {
            t.replace("<s>", "")
                .chars()
                .filter(|c| !c.is_alphabetic())
                .count() as u64
        })
        .sum();
    let total: u64 = texts.iter().map(|t| t.len() as u64).sum();
    let pre = Pretokenizer::new(r"\p{L}+").unwrap();
    for block in [16, 64, 1 << 20] {
        let mut c = WordCounter::new(&pre, &["<s>".to_string()])
            .unwrap()
            .with_block_size(block);
        c.add_texts(&texts);
        let cov = c.coverage();
        assert_eq!((cov.dropped, cov.bytes), (want, total), "block {block}");
        assert!(cov.check(false).is_ok());
        assert!(cov
            .check(true)
            .unwrap_err()
            .to_string()
            .contains("uncovered"));
    }
}
