//! Bencode (BEP 3), the lab's `.torrent` (one file, v1 info dictionary) and the tracker's
//! scrape answer: the formats the BitTorrent phase writes and reads.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::Path;

use anyhow::{bail, Context as _};
use sha1::Digest as _;

/// A bencoded value (BEP 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bencode {
    /// `i<n>e`.
    Int(i64),
    /// `<len>:<bytes>`.
    Bytes(Vec<u8>),
    /// `l...e`.
    List(Vec<Bencode>),
    /// `d...e`, keys in raw byte order (a `BTreeMap` keeps them so, as the format demands).
    Dict(BTreeMap<Vec<u8>, Bencode>),
}

impl Bencode {
    /// A byte string from text.
    pub fn str(s: &str) -> Self {
        Self::Bytes(s.as_bytes().to_vec())
    }

    /// Appends the encoding of `self` to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Self::Int(n) => out.extend_from_slice(format!("i{n}e").as_bytes()),
            Self::Bytes(b) => {
                out.extend_from_slice(format!("{}:", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Self::List(l) => {
                out.push(b'l');
                for v in l {
                    v.encode(out);
                }
                out.push(b'e');
            }
            Self::Dict(d) => {
                out.push(b'd');
                for (k, v) in d {
                    out.extend_from_slice(format!("{}:", k.len()).as_bytes());
                    out.extend_from_slice(k);
                    v.encode(out);
                }
                out.push(b'e');
            }
        }
    }

    /// The encoding of `self`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// Decodes one complete value (trailing bytes are an error). For the tracker's answers:
    /// bounded nesting, lengths checked against the input before anything is allocated.
    pub fn decode(input: &[u8]) -> anyhow::Result<Self> {
        let (v, used) = Self::decode_prefix(input, 0)?;
        if used != input.len() {
            bail!("bencode: {} trailing bytes", input.len() - used);
        }
        Ok(v)
    }

    fn decode_prefix(input: &[u8], depth: usize) -> anyhow::Result<(Self, usize)> {
        if depth > 32 {
            bail!("bencode: nested too deeply");
        }
        let first = *input.first().context("bencode: unexpected end")?;
        match first {
            b'i' => {
                let end = input
                    .iter()
                    .position(|&c| c == b'e')
                    .context("bencode: unterminated integer")?;
                let text = std::str::from_utf8(&input[1..end]).context("bencode: integer")?;
                let n: i64 = text
                    .parse()
                    .with_context(|| format!("bencode: bad integer {text:?}"))?;
                Ok((Self::Int(n), end + 1))
            }
            b'0'..=b'9' => {
                let colon = input
                    .iter()
                    .position(|&c| c == b':')
                    .context("bencode: string without ':'")?;
                let text = std::str::from_utf8(&input[..colon]).context("bencode: length")?;
                let len: usize = text
                    .parse()
                    .with_context(|| format!("bencode: bad length {text:?}"))?;
                let start = colon + 1;
                let end = start
                    .checked_add(len)
                    .filter(|&e| e <= input.len())
                    .context("bencode: string longer than the input")?;
                Ok((Self::Bytes(input[start..end].to_vec()), end))
            }
            b'l' => {
                let mut pos = 1;
                let mut items = Vec::new();
                loop {
                    if *input.get(pos).context("bencode: unterminated list")? == b'e' {
                        return Ok((Self::List(items), pos + 1));
                    }
                    let (v, used) = Self::decode_prefix(&input[pos..], depth + 1)?;
                    items.push(v);
                    pos += used;
                }
            }
            b'd' => {
                let mut pos = 1;
                let mut map = BTreeMap::new();
                loop {
                    if *input.get(pos).context("bencode: unterminated dictionary")? == b'e' {
                        return Ok((Self::Dict(map), pos + 1));
                    }
                    let (k, used) = Self::decode_prefix(&input[pos..], depth + 1)?;
                    let Self::Bytes(k) = k else {
                        bail!("bencode: dictionary key is not a string");
                    };
                    pos += used;
                    let (v, used) = Self::decode_prefix(&input[pos..], depth + 1)?;
                    map.insert(k, v);
                    pos += used;
                }
            }
            c => bail!("bencode: unexpected byte {c:#04x}"),
        }
    }

    /// The value under `key` of a dictionary.
    pub fn get(&self, key: &str) -> Option<&Self> {
        match self {
            Self::Dict(d) => d.get(key.as_bytes()),
            _ => None,
        }
    }
}

/// A single-file torrent made for the lab's file.
#[derive(Debug, Clone)]
pub struct Torrent {
    /// The `.torrent` file's bytes.
    pub bytes: Vec<u8>,
    /// SHA-1 of the bencoded `info` dictionary.
    pub info_hash: [u8; 20],
    /// Piece length, bytes.
    pub piece_length: u64,
}

impl Torrent {
    /// Makes a torrent of `file` named `name` (the file name every client saves it under),
    /// announcing to `announce`, in pieces of `piece_length` bytes.
    pub fn make(
        file: &Path,
        name: &str,
        announce: &str,
        piece_length: u64,
    ) -> anyhow::Result<Self> {
        if piece_length == 0 {
            bail!("torrent piece length must be positive");
        }
        let mut f =
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let mut pieces = Vec::new();
        let mut buf = vec![0u8; usize::try_from(piece_length).context("piece length")?];
        let mut length: u64 = 0;
        loop {
            // One piece: fill the buffer (short only at the end of the file).
            let mut filled = 0;
            while filled < buf.len() {
                let n = f
                    .read(&mut buf[filled..])
                    .with_context(|| format!("reading {}", file.display()))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            pieces.extend_from_slice(&sha1::Sha1::digest(&buf[..filled]));
            length += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        if length == 0 {
            bail!("{} is empty: nothing to make a torrent of", file.display());
        }
        let mut info = BTreeMap::new();
        info.insert(
            b"length".to_vec(),
            Bencode::Int(i64::try_from(length).context("file length")?),
        );
        info.insert(b"name".to_vec(), Bencode::str(name));
        info.insert(
            b"piece length".to_vec(),
            Bencode::Int(i64::try_from(piece_length).context("piece length")?),
        );
        info.insert(b"pieces".to_vec(), Bencode::Bytes(pieces));
        let info = Bencode::Dict(info);
        let info_hash: [u8; 20] = sha1::Sha1::digest(info.to_bytes()).into();
        let mut top = BTreeMap::new();
        top.insert(b"announce".to_vec(), Bencode::str(announce));
        top.insert(b"created by".to_vec(), Bencode::str("damselfly loadgen"));
        top.insert(b"info".to_vec(), info);
        Ok(Self {
            bytes: Bencode::Dict(top).to_bytes(),
            info_hash,
            piece_length,
        })
    }

    /// The info hash as 40 hex digits (opentracker's whitelist format).
    pub fn info_hash_hex(&self) -> String {
        hex::encode(self.info_hash)
    }

    /// The info hash percent-encoded for a tracker URL (`info_hash=`).
    pub fn info_hash_urlencoded(&self) -> String {
        self.info_hash.iter().map(|b| format!("%{b:02X}")).collect()
    }
}

/// Seeders the tracker counts for the torrent `info_hash`, from its scrape answer.
pub fn scrape_complete(answer: &[u8], info_hash: &[u8; 20]) -> anyhow::Result<i64> {
    let v = Bencode::decode(answer).context("parsing the tracker's scrape answer")?;
    if let Some(Bencode::Bytes(reason)) = v.get("failure reason") {
        bail!("tracker: {}", String::from_utf8_lossy(reason));
    }
    let Some(Bencode::Dict(files)) = v.get("files") else {
        bail!("scrape answer without `files`");
    };
    match files.get(info_hash.as_slice()) {
        Some(entry) => match entry.get("complete") {
            Some(Bencode::Int(n)) => Ok(*n),
            _ => bail!("scrape entry without `complete`"),
        },
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bencode_round_trip() {
        let mut d = BTreeMap::new();
        d.insert(b"pieces".to_vec(), Bencode::Bytes(vec![0, 1, 2]));
        d.insert(b"piece length".to_vec(), Bencode::Int(262_144));
        d.insert(
            b"list".to_vec(),
            Bencode::List(vec![Bencode::Int(-3), Bencode::str("spam")]),
        );
        let v = Bencode::Dict(d);
        let bytes = v.to_bytes();
        // Keys in raw byte order: "list" < "piece length" < "pieces".
        assert_eq!(
            bytes,
            b"d4:listli-3e4:spame12:piece lengthi262144e6:pieces3:\x00\x01\x02e".to_vec()
        );
        assert_eq!(Bencode::decode(&bytes).ok(), Some(v));
    }

    #[test]
    fn bencode_rejects_malformed() {
        for bad in [
            &b""[..],
            b"i12",
            b"5:abc",
            b"li1e",
            b"di1ei2ee",
            b"x",
            b"i1ee",
            b"99999999999999999999:a",
        ] {
            assert!(Bencode::decode(bad).is_err(), "{bad:?}");
        }
        let deep = "l".repeat(100) + &"e".repeat(100);
        assert!(Bencode::decode(deep.as_bytes()).is_err());
    }

    #[test]
    fn torrent_of_a_file() {
        let dir = std::env::temp_dir().join(format!("bt-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("f.bin");
        // 2.5 pieces of 4 bytes.
        std::fs::write(&file, b"abcdefghij").expect("writing");
        let t = Torrent::make(&file, "f.bin", "http://10.200.0.3:6969/announce", 4)
            .expect("making the torrent");
        let v = Bencode::decode(&t.bytes).expect("decoding the torrent");
        let info = v.get("info").expect("info");
        assert_eq!(info.get("length"), Some(&Bencode::Int(10)));
        assert_eq!(info.get("piece length"), Some(&Bencode::Int(4)));
        let Some(Bencode::Bytes(pieces)) = info.get("pieces") else {
            panic!("no pieces");
        };
        assert_eq!(pieces.len(), 3 * 20);
        assert_eq!(&pieces[40..], sha1::Sha1::digest(b"ij").as_slice());
        let hash: [u8; 20] = sha1::Sha1::digest(info.to_bytes()).into();
        assert_eq!(hash, t.info_hash);
        assert_eq!(t.info_hash_hex().len(), 40);
        assert_eq!(t.info_hash_urlencoded().len(), 60);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn scrape_answers() {
        let h = [7u8; 20];
        let mut ans = b"d5:filesd20:".to_vec();
        ans.extend_from_slice(&h);
        ans.extend_from_slice(b"d8:completei1e10:downloadedi0e10:incompletei2eeee");
        assert_eq!(scrape_complete(&ans, &h).ok(), Some(1));
        assert_eq!(scrape_complete(b"d5:filesdee", &h).ok(), Some(0));
        assert!(scrape_complete(b"d14:failure reason4:nopee", &h).is_err());
        assert!(scrape_complete(b"garbage", &h).is_err());
    }
}
