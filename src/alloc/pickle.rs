//! A streaming reader of the pickles PyTorch's memory snapshots are: Python's pickle
//! machine over plain values (None, bools, ints, floats, strings, bytes, lists, tuples,
//! dicts, sets), protocols 0 to 5, that hands each trace entry to its caller as soon as the
//! entry is appended to its list instead of building the whole tree.
//!
//! Python's pickler appends a list's items in batches of at most 1000 (`APPENDS`), so a
//! snapshot's millions of trace entries pass through the machine a batch at a time; an
//! entry handed on is also dropped from the memo (Python memoizes every dict, and nothing
//! refers to a trace entry twice). What stays in memory is the rest of the tree (the
//! `segments` of the dump, the settings) and the memoized objects entries share (the
//! action strings and stack frames PyTorch builds once and refers to from many entries).
//!
//! serde-pickle reads the same files, but only into a complete value tree (about 40 times
//! the file's size for a snapshot): it stays the writer, and the tests check this reader
//! against it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufRead, ErrorKind};
use std::rc::Rc;

/// A value on the machine's stack.
#[derive(Debug, Clone)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer that does not fit in 64 bits (only its sign and size are of no use here).
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(usize),
    List(Rc<RefCell<List>>),
    Dict(Rc<RefCell<Dict>>),
    Tuple(Rc<[Obj]>),
}

#[derive(Debug, Default)]
pub struct List {
    /// The order in which the machine created this list (entries are handed on with it).
    pub id: u32,
    pub items: Vec<Obj>,
}

#[derive(Debug, Default)]
pub struct Dict {
    /// Where the memo holds this dict, so that a consumed trace entry leaves it.
    memo: Option<u32>,
    pub items: Vec<(Obj, Obj)>,
}

impl Dict {
    /// The value under the string key `k`.
    pub fn get(&self, k: &str) -> Option<&Obj> {
        // The last of a repeated key wins, as in Python.
        self.items
            .iter()
            .rev()
            .find(|(key, _)| matches!(key, Obj::Str(s) if &**s == k))
            .map(|(_, v)| v)
    }
}

impl Obj {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Obj::Int(i) => u64::try_from(*i).ok(),
            Obj::Bool(b) => Some(u64::from(*b)),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A short name of the value's type, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "a bool",
            Obj::Int(_) | Obj::BigInt => "an int",
            Obj::Float(_) => "a float",
            Obj::Str(_) => "a string",
            Obj::Bytes(_) => "bytes",
            Obj::List(_) => "a list",
            Obj::Dict(_) => "a dict",
            Obj::Tuple(_) => "a tuple",
        }
    }
}

/// A trace entry: a dict with a string `action`, handed on when appended to its list.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dict: Rc<RefCell<Dict>>,
}

impl Entry {
    pub fn action(&self) -> String {
        self.dict
            .borrow()
            .get("action")
            .and_then(Obj::as_str)
            .unwrap_or_default()
            .to_string()
    }

    /// The integer under `k` (0 where absent or not a non-negative integer).
    pub fn int(&self, k: &str) -> u64 {
        self.dict.borrow().get(k).and_then(Obj::as_u64).unwrap_or(0)
    }

    /// The innermost stack frame, `file:line name`, or `?`.
    pub fn frame(&self) -> String {
        let d = self.dict.borrow();
        let Some(Obj::List(frames)) = d.get("frames") else {
            return "?".into();
        };
        let frames = frames.borrow();
        for f in &frames.items {
            if let Obj::Dict(f) = f {
                let f = f.borrow();
                let file = f.get("filename").and_then(Obj::as_str).unwrap_or("?");
                let line = f.get("line").and_then(Obj::as_u64).unwrap_or(0);
                let name = f.get("name").and_then(Obj::as_str).unwrap_or("?");
                return format!("{file}:{line} {name}");
            }
        }
        "?".into()
    }
}

/// How the decoding went, for the tests that hold its memory to the live state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub entries: u64,
    /// The most values the stack (all marks together) held at once.
    pub max_stack: usize,
    /// The most objects the memo held at once, and at the end.
    pub max_memo: usize,
    pub memo_at_end: usize,
    pub bytes: u64,
}

/// Why a file could not be decoded; the caller names the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PickleError {
    /// Not a pickle, or a broken one (the reason).
    Malformed(String),
    /// A pickle of Python objects rather than plain values (the opcode's name).
    NotPlain(&'static str),
    Io(String),
    /// The entry callback's own error, passed through.
    Sink(String),
}

type Res<T> = std::result::Result<T, PickleError>;

fn malformed<T>(m: impl Into<String>) -> Res<T> {
    Err(PickleError::Malformed(m.into()))
}

struct Reader<R> {
    inner: R,
    pos: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> Reader<R> {
    fn byte(&mut self) -> Res<u8> {
        let b = loop {
            match self.inner.fill_buf() {
                Ok([]) => return malformed("the file ends inside the pickle"),
                Ok(b) => break b[0],
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(PickleError::Io(e.to_string())),
            }
        };
        self.inner.consume(1);
        self.pos += 1;
        Ok(b)
    }

    /// The next `n` bytes, in a buffer reused from call to call.
    fn take(&mut self, n: u64) -> Res<&[u8]> {
        // No length in a pickle of plain values comes near this; a corrupt one would
        // otherwise ask for memory it does not have.
        if n > 1 << 34 {
            return malformed(format!("a length of {n} bytes at byte {}", self.pos));
        }
        self.buf.clear();
        let mut left = n as usize;
        while left > 0 {
            let chunk = match self.inner.fill_buf() {
                Ok([]) => return malformed("the file ends inside the pickle"),
                Ok(b) => b,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(PickleError::Io(e.to_string())),
            };
            let k = chunk.len().min(left);
            self.buf.extend_from_slice(&chunk[..k]);
            self.inner.consume(k);
            left -= k;
        }
        self.pos += n;
        Ok(&self.buf)
    }

    fn array<const N: usize>(&mut self) -> Res<[u8; N]> {
        let b = self.take(N as u64)?;
        Ok(b.try_into().expect("N bytes"))
    }

    /// A text line without its newline (protocol 0's arguments).
    fn line(&mut self) -> Res<String> {
        let out = self.line_bytes()?;
        String::from_utf8(out)
            .map_err(|_| PickleError::Malformed("a text argument that is not UTF-8".into()))
    }

    fn line_bytes(&mut self) -> Res<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let b = self.byte()?;
            if b == b'\n' {
                break;
            }
            out.push(b);
            if out.len() > 1 << 20 {
                return malformed("a text argument longer than 1 MiB");
            }
        }
        Ok(out)
    }
}

struct Machine<'s> {
    stack: Vec<Obj>,
    marks: Vec<Vec<Obj>>,
    memo: HashMap<u32, Obj>,
    /// Memo slots emptied by consumed entries (MEMOIZE numbers slots as Python's
    /// unpickler does, by how many it has filled).
    released: u32,
    lists: u32,
    depth: usize,
    stats: Stats,
    sink: &'s mut dyn FnMut(u32, Entry) -> std::result::Result<(), String>,
}

fn utf8(b: &[u8]) -> Res<Obj> {
    match std::str::from_utf8(b) {
        Ok(s) => Ok(Obj::Str(s.into())),
        Err(_) => malformed("a string that is not UTF-8"),
    }
}

fn long(b: &[u8]) -> Obj {
    // Little-endian two's complement of any length.
    if b.is_empty() {
        return Obj::Int(0);
    }
    if b.len() > 8 {
        let neg = b[b.len() - 1] & 0x80 != 0;
        let fill = if neg { 0xff } else { 0 };
        if b[8..].iter().any(|&x| x != fill) || (b[7] & 0x80 != 0) != neg {
            return Obj::BigInt;
        }
    }
    let neg = b[b.len().min(8) - 1] & 0x80 != 0;
    let mut v = [if neg { 0xffu8 } else { 0 }; 8];
    let n = b.len().min(8);
    v[..n].copy_from_slice(&b[..n]);
    Obj::Int(i64::from_le_bytes(v))
}

/// Python's raw-unicode-escape: each byte a Latin-1 character, except `\uXXXX` and
/// `\UXXXXXXXX` (how the pickler writes backslashes, newlines and characters past 255).
fn raw_unicode_escape(b: &[u8]) -> Res<String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let digits = match (b[i], b.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            (c, _) => {
                out.push(char::from(c));
                i += 1;
                continue;
            }
        };
        let hex = b
            .get(i + 2..i + 2 + digits)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32);
        match hex {
            Some(c) => out.push(c),
            None => return malformed("a broken \\u escape in a protocol 0 string"),
        }
        i += 2 + digits;
    }
    Ok(out)
}

fn text_int(s: &str) -> Res<Obj> {
    let s = s.trim_end_matches('L');
    match s {
        "00" => return Ok(Obj::Bool(false)),
        "01" => return Ok(Obj::Bool(true)),
        _ => {}
    }
    match s.parse::<i64>() {
        Ok(v) => Ok(Obj::Int(v)),
        Err(_)
            if !s.is_empty()
                && s.trim_start_matches('-')
                    .bytes()
                    .all(|c| c.is_ascii_digit()) =>
        {
            Ok(Obj::BigInt)
        }
        Err(_) => malformed(format!("an integer '{s}' that does not parse")),
    }
}

impl Machine<'_> {
    fn push(&mut self, o: Obj) {
        self.stack.push(o);
        self.depth += 1;
        self.stats.max_stack = self.stats.max_stack.max(self.depth);
    }

    fn pop(&mut self) -> Res<Obj> {
        match self.stack.pop() {
            Some(o) => {
                self.depth -= 1;
                Ok(o)
            }
            None => malformed("an opcode pops an empty stack"),
        }
    }

    fn top(&mut self) -> Res<&mut Obj> {
        match self.stack.last_mut() {
            Some(o) => Ok(o),
            None => malformed("an opcode reads an empty stack"),
        }
    }

    fn mark(&mut self) {
        let items = std::mem::take(&mut self.stack);
        self.marks.push(items);
    }

    fn pop_mark(&mut self) -> Res<Vec<Obj>> {
        let Some(below) = self.marks.pop() else {
            return malformed("an opcode needs a mark and there is none");
        };
        let items = std::mem::replace(&mut self.stack, below);
        self.depth -= items.len();
        Ok(items)
    }

    fn memo_put(&mut self, idx: u32) -> Res<()> {
        let o = self.top()?.clone();
        if let Obj::Dict(d) = &o {
            d.borrow_mut().memo = Some(idx);
        }
        self.memo.insert(idx, o);
        self.stats.max_memo = self.stats.max_memo.max(self.memo.len());
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Res<()> {
        match self.memo.get(&idx) {
            Some(o) => {
                let o = o.clone();
                self.push(o);
                Ok(())
            }
            None => malformed(format!(
                "memo {idx} is read before it is written (or refers to a trace entry, which nothing should)"
            )),
        }
    }

    fn append(&mut self, items: Vec<Obj>) -> Res<()> {
        let Obj::List(list) = self.top()?.clone() else {
            let kind = self.top()?.kind();
            return malformed(format!("APPEND(S) to {kind}, not a list"));
        };
        let id = list.borrow().id;
        let mut kept = Vec::new();
        for item in items {
            let entry = match &item {
                Obj::Dict(d) if d.borrow().get("action").and_then(Obj::as_str).is_some() => {
                    Some(d.clone())
                }
                _ => None,
            };
            match entry {
                Some(d) => {
                    let slot = d.borrow().memo;
                    if let Some(m) = slot {
                        if matches!(self.memo.get(&m), Some(Obj::Dict(x)) if Rc::ptr_eq(x, &d)) {
                            self.memo.remove(&m);
                            self.released += 1;
                        }
                    }
                    self.stats.entries += 1;
                    (self.sink)(id, Entry { dict: d }).map_err(PickleError::Sink)?;
                }
                None => kept.push(item),
            }
        }
        list.borrow_mut().items.extend(kept);
        Ok(())
    }

    fn set_items(&mut self, items: Vec<Obj>) -> Res<()> {
        if items.len() % 2 != 0 {
            return malformed("SETITEMS with an odd number of values");
        }
        let Obj::Dict(d) = self.top()? else {
            let kind = self.top()?.kind();
            return malformed(format!("SETITEM(S) on {kind}, not a dict"));
        };
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.items.push((k, v));
        }
        Ok(())
    }

    fn new_list(&mut self, items: Vec<Obj>) -> Obj {
        self.lists += 1;
        Obj::List(Rc::new(RefCell::new(List {
            id: self.lists - 1,
            items,
        })))
    }
}

/// Decodes the pickle from `src`, handing every trace entry to `sink` with the id of the
/// list it is appended to (lists are numbered in the order the pickle creates them, the
/// same on every read of the same file). Returns the top-level value, in which the trace
/// lists are empty, and the decoder's figures.
pub fn decode<R: BufRead>(
    src: R,
    sink: &mut dyn FnMut(u32, Entry) -> std::result::Result<(), String>,
) -> Res<(Obj, Stats)> {
    let mut r = Reader {
        inner: src,
        pos: 0,
        buf: Vec::new(),
    };
    let mut m = Machine {
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        released: 0,
        lists: 0,
        depth: 0,
        stats: Stats::default(),
        sink,
    };
    loop {
        let at = r.pos;
        let op = match r.byte() {
            Ok(b) => b,
            Err(PickleError::Malformed(_)) if at == 0 => return malformed("the file is empty"),
            Err(e) => return Err(e),
        };
        match op {
            // PROTO n
            0x80 => {
                let v = r.byte()?;
                if v > 5 {
                    return malformed(format!("pickle protocol {v} (this reader knows 0 to 5)"));
                }
            }
            // FRAME n: a length hint only.
            0x95 => {
                r.array::<8>()?;
            }
            b'.' => {
                let top = m.pop()?;
                if !m.stack.is_empty() || !m.marks.is_empty() {
                    return malformed("values are left on the stack at STOP");
                }
                m.stats.bytes = r.pos;
                m.stats.memo_at_end = m.memo.len();
                return Ok((top, m.stats));
            }
            b'N' => m.push(Obj::None),
            0x88 => m.push(Obj::Bool(true)),
            0x89 => m.push(Obj::Bool(false)),
            // BININT, BININT1, BININT2
            b'J' => {
                let v = i32::from_le_bytes(r.array::<4>()?);
                m.push(Obj::Int(v.into()));
            }
            b'K' => {
                let v = r.byte()?;
                m.push(Obj::Int(v.into()));
            }
            b'M' => {
                let v = u16::from_le_bytes(r.array::<2>()?);
                m.push(Obj::Int(v.into()));
            }
            // LONG1, LONG4
            0x8a => {
                let n = r.byte()?;
                let o = long(r.take(n.into())?);
                m.push(o);
            }
            0x8b => {
                let n = i32::from_le_bytes(r.array::<4>()?);
                if n < 0 {
                    return malformed("LONG4 with a negative length");
                }
                let o = long(r.take(n as u64)?);
                m.push(o);
            }
            // INT, LONG (protocol 0)
            b'I' | b'L' => {
                let s = r.line()?;
                let o = text_int(&s)?;
                m.push(o);
            }
            // BINFLOAT, FLOAT
            b'G' => {
                let v = f64::from_be_bytes(r.array::<8>()?);
                m.push(Obj::Float(v));
            }
            b'F' => {
                let s = r.line()?;
                match s.trim().parse::<f64>() {
                    Ok(v) => m.push(Obj::Float(v)),
                    Err(_) => return malformed(format!("a float '{s}' that does not parse")),
                }
            }
            // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            0x8c => {
                let n = r.byte()?;
                let o = utf8(r.take(n.into())?)?;
                m.push(o);
            }
            b'X' => {
                let n = u32::from_le_bytes(r.array::<4>()?);
                let o = utf8(r.take(n.into())?)?;
                m.push(o);
            }
            0x8d => {
                let n = u64::from_le_bytes(r.array::<8>()?);
                let o = utf8(r.take(n)?)?;
                m.push(o);
            }
            // UNICODE (protocol 0)
            b'V' => {
                let s = raw_unicode_escape(&r.line_bytes()?)?;
                m.push(Obj::Str(s.into()));
            }
            // SHORT_BINSTRING, BINSTRING (Python 2 str): text here
            b'U' => {
                let n = r.byte()?;
                let s: String = r.take(n.into())?.iter().map(|&b| b as char).collect();
                m.push(Obj::Str(s.into()));
            }
            b'T' => {
                let n = i32::from_le_bytes(r.array::<4>()?);
                if n < 0 {
                    return malformed("BINSTRING with a negative length");
                }
                let s: String = r.take(n as u64)?.iter().map(|&b| b as char).collect();
                m.push(Obj::Str(s.into()));
            }
            // SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
            b'C' => {
                let n = r.byte()?;
                r.take(n.into())?;
                m.push(Obj::Bytes(n.into()));
            }
            b'B' => {
                let n = u32::from_le_bytes(r.array::<4>()?);
                r.take(n.into())?;
                m.push(Obj::Bytes(n as usize));
            }
            0x8e | 0x96 => {
                let n = u64::from_le_bytes(r.array::<8>()?);
                r.take(n)?;
                m.push(Obj::Bytes(n as usize));
            }
            // EMPTY_LIST, LIST, EMPTY_SET, FROZENSET (sets read as lists)
            b']' | 0x8f => {
                let l = m.new_list(Vec::new());
                m.push(l);
            }
            b'l' | 0x91 => {
                let items = m.pop_mark()?;
                let l = m.new_list(items);
                m.push(l);
            }
            // APPEND, APPENDS, ADDITEMS
            b'a' => {
                let v = m.pop()?;
                m.append(vec![v])?;
            }
            b'e' | 0x90 => {
                let items = m.pop_mark()?;
                m.append(items)?;
            }
            // EMPTY_DICT, DICT
            b'}' => m.push(Obj::Dict(Rc::default())),
            b'd' => {
                let items = m.pop_mark()?;
                let d = Obj::Dict(Rc::default());
                m.push(d);
                m.set_items(items)?;
            }
            // SETITEM, SETITEMS
            b's' => {
                let v = m.pop()?;
                let k = m.pop()?;
                m.set_items(vec![k, v])?;
            }
            b'u' => {
                let items = m.pop_mark()?;
                m.set_items(items)?;
            }
            // EMPTY_TUPLE, TUPLE, TUPLE1..3
            b')' => m.push(Obj::Tuple(Rc::new([]))),
            b't' => {
                let items = m.pop_mark()?;
                m.push(Obj::Tuple(items.into()));
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                if m.stack.len() < n {
                    return malformed("TUPLE with too few values on the stack");
                }
                let items = m.stack.split_off(m.stack.len() - n);
                m.depth -= n;
                m.push(Obj::Tuple(items.into()));
            }
            // MARK, POP, POP_MARK, DUP
            b'(' => m.mark(),
            b'0' => {
                m.pop()?;
            }
            b'1' => {
                m.pop_mark()?;
            }
            b'2' => {
                let o = m.top()?.clone();
                m.push(o);
            }
            // PUT, BINPUT, LONG_BINPUT, MEMOIZE
            b'p' => {
                let s = r.line()?;
                let idx = s
                    .parse::<u32>()
                    .or_else(|_| malformed(format!("PUT of '{s}'")))?;
                m.memo_put(idx)?;
            }
            b'q' => {
                let idx = r.byte()?;
                m.memo_put(idx.into())?;
            }
            b'r' => {
                let idx = u32::from_le_bytes(r.array::<4>()?);
                m.memo_put(idx)?;
            }
            0x94 => {
                let idx = m.memo.len() as u32 + m.released;
                m.memo_put(idx)?;
            }
            // GET, BINGET, LONG_BINGET
            b'g' => {
                let s = r.line()?;
                let idx = s
                    .parse::<u32>()
                    .or_else(|_| malformed(format!("GET of '{s}'")))?;
                m.memo_get(idx)?;
            }
            b'h' => {
                let idx = r.byte()?;
                m.memo_get(idx.into())?;
            }
            b'j' => {
                let idx = u32::from_le_bytes(r.array::<4>()?);
                m.memo_get(idx)?;
            }
            // Python objects: classes, their construction, persistent ids, buffers.
            b'c' => return Err(PickleError::NotPlain("GLOBAL")),
            0x93 => return Err(PickleError::NotPlain("STACK_GLOBAL")),
            b'R' => return Err(PickleError::NotPlain("REDUCE")),
            b'b' => return Err(PickleError::NotPlain("BUILD")),
            0x81 => return Err(PickleError::NotPlain("NEWOBJ")),
            0x92 => return Err(PickleError::NotPlain("NEWOBJ_EX")),
            b'i' => return Err(PickleError::NotPlain("INST")),
            b'o' => return Err(PickleError::NotPlain("OBJ")),
            b'P' | b'Q' => return Err(PickleError::NotPlain("PERSID")),
            0x82..=0x84 => return Err(PickleError::NotPlain("EXT")),
            0x97 | 0x98 => return Err(PickleError::NotPlain("NEXT_BUFFER")),
            other => {
                return malformed(format!(
                    "byte {at} is {other:#04x}, which is no pickle opcode"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top(bytes: &[u8]) -> Res<Obj> {
        decode(bytes, &mut |_, _| Ok(())).map(|(o, _)| o)
    }

    fn int(bytes: &[u8]) -> Option<i64> {
        match top(bytes) {
            Ok(Obj::Int(v)) => Some(v),
            _ => None,
        }
    }

    #[test]
    fn integers_of_every_width_and_sign() {
        // BININT1, BININT2, BININT (signed), LONG1 of 8 and 9 bytes, protocol 0's INT.
        assert_eq!(int(b"\x80\x02K\xff."), Some(255));
        assert_eq!(int(b"\x80\x02M\xff\xff."), Some(65535));
        assert_eq!(int(b"\x80\x02J\xfe\xff\xff\xff."), Some(-2));
        assert_eq!(int(b"\x80\x02\x8a\x00."), Some(0));
        assert_eq!(
            int(b"\x80\x02\x8a\x08\xff\xff\xff\xff\xff\xff\xff\x7f."),
            Some(i64::MAX)
        );
        assert_eq!(int(b"\x80\x02\x8a\x02\x00\xff."), Some(-256));
        // 2**63 needs a ninth byte and does not fit.
        assert!(matches!(
            top(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00."),
            Ok(Obj::BigInt)
        ));
        // -2**63 in nine bytes still fits.
        assert_eq!(
            int(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\xff."),
            Some(i64::MIN)
        );
        assert_eq!(int(b"I-42\n."), Some(-42));
        assert!(matches!(top(b"I01\n."), Ok(Obj::Bool(true))));
        assert_eq!(int(b"L12345678901L\n."), Some(12345678901));
    }

    #[test]
    fn entries_are_handed_on_and_leave_the_memo() {
        // [{'action': 'alloc', 'addr': 5}, {'action': 'alloc', 'addr': 6}], memoized as
        // Python does it, the second entry reusing the first's strings.
        let bytes = b"\x80\x04]\x94(}\x94(\x8c\x06action\x94\x8c\x05alloc\x94\x8c\x04addr\x94K\x05u}\x94(h\x02h\x03h\x04K\x06ue.";
        let mut got = Vec::new();
        let (o, stats) = decode(&bytes[..], &mut |list, e| {
            got.push((list, e.action(), e.int("addr")));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![(0, "alloc".into(), 5), (0, "alloc".into(), 6)]);
        let Obj::List(l) = o else { panic!() };
        assert!(l.borrow().items.is_empty());
        assert_eq!(stats.entries, 2);
        // The list and the three strings stay; both entry dicts left.
        assert_eq!((stats.max_memo, stats.memo_at_end), (6, 4));
    }

    #[test]
    fn broken_pickles_say_why() {
        let e = |b: &[u8]| match top(b) {
            Err(PickleError::Malformed(m)) => m,
            other => panic!("{other:?}"),
        };
        assert!(e(b"").contains("empty"));
        assert!(e(b"\x80\x04]\x94(K\x01").contains("ends inside"));
        assert!(e(b"\x80\x04h\x07.").contains("memo 7"));
        assert!(e(b"\x80\x04K\x01K\x02.").contains("left on the stack"));
        assert!(e(b"\x80\x09.").contains("protocol 9"));
        assert!(e(b"\x80\x04\xff").contains("no pickle opcode"));
        assert!(e(b"\x80\x04K\x01K\x02a.").contains("not a list"));
        assert!(e(b"\x80\x04K\x01a.").contains("empty stack"));
        assert!(matches!(
            top(b"\x80\x02c__main__\nX\n)\x81."),
            Err(PickleError::NotPlain("GLOBAL"))
        ));
    }
}
