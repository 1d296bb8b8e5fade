use super::*;
use proptest::prelude::*;
use std::sync::LazyLock;

/// A tiny byte-level BPE trainer (most frequent pair, ties to the smallest pair) for test vocabularies.
pub(crate) fn train_vocab(text: &str, pattern: &str, merges: usize) -> Vec<Vec<u8>> {
    let pre = Pretokenizer::new(pattern).unwrap();
    let mut words: Vec<Vec<Vec<u8>>> = pre
        .split(text)
        .map(|p| p.bytes().map(|b| vec![b]).collect())
        .collect();
    let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    for _ in 0..merges {
        let mut counts: std::collections::BTreeMap<(Vec<u8>, Vec<u8>), usize> = Default::default();
        for w in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].clone(), p[1].clone())).or_default() += 1;
            }
        }
        let Some(best) = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(k, _)| k.clone())
        else {
            break;
        };
        let merged = [best.0.clone(), best.1.clone()].concat();
        for w in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == best.0 && w[i + 1] == best.1 {
                    w[i] = merged.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        vocab.push(merged);
    }
    vocab
}

/// tiktoken's `byte_pair_encode`, written out naively on byte strings.
fn reference_piece(vocab: &FxHashMap<Vec<u8>, u32>, piece: &[u8]) -> Vec<u32> {
    let mut parts: Vec<Vec<u8>> = piece.iter().map(|&b| vec![b]).collect();
    loop {
        let best = (0..parts.len().saturating_sub(1))
            .filter_map(|i| {
                vocab
                    .get(&[parts[i].clone(), parts[i + 1].clone()].concat())
                    .map(|&r| (r, i))
            })
            .min();
        let Some((_, i)) = best else { break };
        let right = parts.remove(i + 1);
        parts[i].extend(right);
    }
    parts.iter().map(|p| vocab[p]).collect()
}

const CORPUS: &str = "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!\n\
    def encode(self, text):\n    return [self.vocab[t] for t in text.split()]\n\
    aaaaaaaaaaaaaaaaaaaaaaaa 1234567890 1234567890 \u{4e2d}\u{6587}\u{4e2d}\u{6587} caf\u{e9} caf\u{e9}\n";

static TOK: LazyLock<Tokenizer> = LazyLock::new(|| {
    let vocab = train_vocab(&CORPUS.repeat(3), "cl100k", 200);
    Tokenizer::from_ranks(
        vocab,
        "cl100k",
        vec![
            ("<|endoftext|>".into(), 1000),
            ("<|fim|>".into(), 1001),
            ("<|fim|>x".into(), 1002),
        ],
    )
    .unwrap()
});

fn reference_encode(tok: &Tokenizer, text: &str) -> Vec<u32> {
    tok.pretokenizer()
        .split(text)
        .flat_map(|p| reference_piece(&tok.encoder, p.as_bytes()))
        .collect()
}

#[test]
fn hand_checked_merges() {
    // vocab: bytes, then "ab", "bc", "abc"; "abc" merges a+b first (lower rank), then ab+c.
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    v.extend([
        b"ab".to_vec(),
        b"bc".to_vec(),
        b"abc".to_vec(),
        b"cc".to_vec(),
    ]);
    let t = Tokenizer::from_ranks(v, r"\S+", vec![]).unwrap();
    assert_eq!(t.encode_ordinary("abc"), vec![258]);
    assert_eq!(t.encode_ordinary("abcc"), vec![258, 99]);
    assert_eq!(t.encode_ordinary("bcc"), vec![257, 99]);
    assert_eq!(t.encode_ordinary("x y"), vec![120, 121]);
}

#[test]
fn special_tokens_follow_tiktoken() {
    let t = &*TOK;
    let err = t.encode("hi <|endoftext|>", &[]).unwrap_err().to_string();
    assert!(err.contains("<|endoftext|>"), "{err}");
    let ids = t
        .encode("hi<|endoftext|>there", &["<|endoftext|>"])
        .unwrap();
    let mut want = t.encode_ordinary("hi");
    want.push(1000);
    want.extend(t.encode_ordinary("there"));
    assert_eq!(ids, want);
    // Not allowed, not disallowed: ordinary text.
    let ids = t.encode_with("a<|endoftext|>", &[], Some(&[])).unwrap();
    assert_eq!(ids, t.encode_ordinary("a<|endoftext|>"));
    // Longest allowed special wins; a longer unallowed one does not hide a shorter allowed one.
    assert_eq!(
        t.encode("<|fim|>x", &["<|fim|>", "<|fim|>x"]).unwrap(),
        vec![1002]
    );
    let ids = t.encode_with("<|fim|>x", &["<|fim|>"], Some(&[])).unwrap();
    assert_eq!(ids[0], 1001);
    assert_eq!(t.n_vocab(), 1003);
    assert_eq!(t.special_token_id("<|fim|>"), Some(1001));
}

#[test]
fn decode_unknown_id_is_an_error() {
    let err = TOK.decode_bytes(&[1, 999]).unwrap_err().to_string();
    assert!(err.contains("999"), "{err}");
    assert_eq!(TOK.decode_bytes(&[1000]).unwrap(), b"<|endoftext|>");
}

#[test]
fn bad_vocabularies_are_rejected() {
    let v: Vec<Vec<u8>> = (0..=254u8).map(|b| vec![b]).collect();
    let e = Tokenizer::from_ranks(v, "gpt2", vec![])
        .unwrap_err()
        .to_string();
    assert!(e.contains("0xFF"), "{e}");
    let mut v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    v.push(b"a".to_vec());
    assert!(Tokenizer::from_ranks(v.clone(), "gpt2", vec![]).is_err());
    v.pop();
    assert!(Tokenizer::from_ranks(v, "gpt2", vec![("x".into(), 3)]).is_err());
}

#[test]
fn worst_case_runs_finish() {
    // One 1 MiB piece: the heap path. Quadratic would take minutes here.
    let text = "a".repeat(1 << 20);
    let ids = TOK.encode_ordinary(&text);
    assert_eq!(TOK.decode_bytes(&ids).unwrap(), text.as_bytes());
}

#[test]
fn fingerprint_depends_on_everything() {
    let v: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let a = Tokenizer::from_ranks(v.clone(), "gpt2", vec![]).unwrap();
    let b = Tokenizer::from_ranks(v.clone(), "cl100k", vec![]).unwrap();
    let c = Tokenizer::from_ranks(v.clone(), "gpt2", vec![("<s>".into(), 256)]).unwrap();
    let a2 = Tokenizer::from_ranks(v, "gpt2", vec![]).unwrap();
    assert_eq!(a.fingerprint(), a2.fingerprint());
    assert_ne!(a.fingerprint(), b.fingerprint());
    assert_ne!(a.fingerprint(), c.fingerprint());
}

fn text_strategy() -> impl Strategy<Value = String> {
    let chars = prop_oneof![
        4 => prop::sample::select(
            "the quick brown fox 1234567890 aaaa \n\t  def encode self text \u{4e2d}\u{6587}\u{e9}!.,;'"
                .chars()
                .collect::<Vec<_>>()
        ),
        1 => any::<char>(),
    ];
    prop::collection::vec(chars, 0..300).prop_map(|v| v.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]
    #[test]
    fn encode_matches_naive_tiktoken_and_round_trips(text in text_strategy()) {
        let ids = TOK.encode_ordinary(&text);
        prop_assert_eq!(&ids, &reference_encode(&TOK, &text));
        prop_assert_eq!(TOK.decode_bytes(&ids).unwrap(), text.as_bytes());
    }

    #[test]
    fn heap_equals_scan(piece in prop::collection::vec(prop::sample::select(b"abcdefo \x00\xff".to_vec()), 1..=merge::SCAN_MAX)) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        merge::merge_scan(&piece, &TOK.ranks, &mut a);
        merge::merge_heap(&piece, &TOK.ranks, &mut b);
        prop_assert_eq!(&a, &b);
        // Both kinds of priority index (the choice depends on piece and vocabulary size).
        for dense in [false, true] {
            let mut c = Vec::new();
            merge::merge_heap_with(&piece, &TOK.ranks, &mut c, dense);
            prop_assert_eq!(&a, &c);
        }
    }

    #[test]
    fn batch_equals_single(texts in prop::collection::vec(text_strategy(), 0..8)) {
        let single: Vec<Vec<u32>> = texts.iter().map(|t| TOK.encode_ordinary(t)).collect();
        prop_assert_eq!(&TOK.encode_ordinary_batch(&texts, Some(2)).unwrap(), &single);
        prop_assert_eq!(&TOK.encode_batch(&texts, &[], Some(&[]), Some(1)).unwrap(), &single);
    }
}

/// Words in Cyrillic, Chinese, accented Latin and emoji (repeated within a text, so the piece cache
/// is hit), with CJK runs longer than the cache's piece limit (merged without it).
fn multilingual_strategy() -> impl Strategy<Value = String> {
    let word = prop::collection::vec(
        prop::sample::select(
            "приветмирдомзнания中文字学习語言éüßñaeoqz😀🎉"
                .chars()
                .collect::<Vec<_>>(),
        ),
        1..12,
    )
    .prop_map(|v| v.into_iter().collect::<String>());
    let long_cjk = prop::collection::vec(
        prop::sample::select("中文字的是不了人我在有他这".chars().collect::<Vec<_>>()),
        cache::MAX_PIECE / 3 + 1..cache::MAX_PIECE,
    )
    .prop_map(|v| v.into_iter().collect::<String>());
    let part = prop_oneof![4 => word, 1 => long_cjk];
    let sep = prop::sample::select(vec![" ", ", ", "\n", "。", " 42 "]);
    prop::collection::vec((part, sep), 0..24).prop_map(|v| {
        let once: String = v.into_iter().map(|(w, s)| w + s).collect();
        once.repeat(2)
    })
}

#[test]
fn piece_cache_is_bounded() {
    // More distinct pieces that are not tokens than the cache holds: it stops at its capacity (the
    // pieces seen first stay); ids stay those of the plain merge, cached or not.
    let tok = Tokenizer::from_ranks(train_vocab(CORPUS, "cl100k", 100), "cl100k", vec![]).unwrap();
    let word = |mut i: usize| {
        let mut w = String::from(" zq");
        while i > 0 {
            w.push((b'a' + (i % 26) as u8) as char);
            i /= 26;
        }
        w
    };
    let text: String = (0..cache::CAPACITY + 5000).map(word).collect();
    assert_eq!(tok.encode_ordinary(&text), reference_encode(&tok, &text));
    let n = tok.cache.len();
    assert_eq!(n, cache::CAPACITY);
    assert_eq!(tok.encode_ordinary(&text), reference_encode(&tok, &text));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn cached_merges_match_naive_tiktoken(text in multilingual_strategy()) {
        let want = reference_encode(&TOK, &text);
        // The second time from the cache; also through two threads sharing it.
        prop_assert_eq!(&TOK.encode_ordinary(&text), &want);
        prop_assert_eq!(&TOK.encode_ordinary(&text), &want);
        let batch = vec![text.clone(); 4];
        prop_assert_eq!(TOK.encode_ordinary_batch(&batch, Some(2)).unwrap(), vec![want; 4]);
    }
}
