//! A small TOML reader: the part of TOML 1.0 the lifecycle's metadata.toml and exec.d output
//! use (tables, arrays of tables, dotted keys, strings in all four forms, booleans, arrays,
//! inline tables), plus numbers and dates kept as raw text so that keys the launcher does not
//! read are skipped whatever their type. Anything else is an error naming the line.

/// A TOML value. Numbers and dates are kept as written: the launcher reads none of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    String(String),
    Bool(bool),
    Other(String),
    Array(Vec<Value>),
    Table(Table),
}

/// A table: keys in the order they were written.
pub type Table = Vec<(String, Value)>;

/// Parses a whole document into its root table.
pub fn parse(text: &str) -> Result<Table, String> {
    let mut parser = Parser {
        text: text.as_bytes(),
        pos: 0,
        line: 1,
    };
    parser
        .document()
        .map_err(|why| format!("line {}: {why}", parser.line))
}

/// The value of `key` in `table`.
pub fn get<'a>(table: &'a Table, key: &str) -> Option<&'a Value> {
    table.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
    line: usize,
}

/// The table at `path` below `table`, made when missing; an array of tables stands for its
/// last table, as TOML's `[[a]]` followed by `[a.b]` means.
fn table_at<'t>(table: &'t mut Table, path: &[String]) -> Result<&'t mut Table, String> {
    let (first, rest) = match path.split_first() {
        Some(split) => split,
        None => return Ok(table),
    };
    let index = match table.iter().position(|(k, _)| k == first) {
        Some(index) => index,
        None => {
            table.push((first.clone(), Value::Table(Vec::new())));
            table.len() - 1
        }
    };
    let next = match &mut table[index].1 {
        Value::Table(inner) => inner,
        Value::Array(items) => match items.last_mut() {
            Some(Value::Table(inner)) => inner,
            _ => return Err(format!("{first:?} is not a table")),
        },
        _ => return Err(format!("{first:?} is not a table")),
    };
    table_at(next, rest)
}

fn insert(table: &mut Table, key: &[String], value: Value) -> Result<(), String> {
    let (last, parents) = key.split_last().expect("a key has at least one part");
    let table = table_at(table, parents)?;
    if table.iter().any(|(k, _)| k == last) {
        return Err(format!("duplicate key {last:?}"));
    }
    table.push((last.clone(), value));
    Ok(())
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.pos).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<u8> {
        self.text.get(self.pos + offset).copied()
    }

    fn starts_with(&self, s: &str) -> bool {
        self.text[self.pos..].starts_with(s.as_bytes())
    }

    fn skip_spaces(&mut self) {
        while let Some(b' ' | b'\t') = self.peek() {
            self.pos += 1;
        }
    }

    /// A newline (`\n` or `\r\n`) here, consumed.
    fn newline(&mut self) -> bool {
        match (self.peek(), self.peek_at(1)) {
            (Some(b'\n'), _) => self.pos += 1,
            (Some(b'\r'), Some(b'\n')) => self.pos += 2,
            _ => return false,
        }
        self.line += 1;
        true
    }

    fn comment(&mut self) -> bool {
        if self.peek() != Some(b'#') {
            return false;
        }
        while let Some(c) = self.peek() {
            if c == b'\n' || (c == b'\r' && self.peek_at(1) == Some(b'\n')) {
                break;
            }
            self.pos += 1;
        }
        true
    }

    /// Spaces, comments and newlines, as allowed inside arrays.
    fn skip_blank(&mut self) {
        loop {
            self.skip_spaces();
            if !(self.comment() | self.newline()) {
                return;
            }
        }
    }

    /// The rest of a line after a key/value pair or a header: spaces and a comment.
    fn end_of_line(&mut self) -> Result<(), String> {
        self.skip_spaces();
        self.comment();
        if self.peek().is_none() || self.newline() {
            Ok(())
        } else {
            Err("unexpected text after the value".into())
        }
    }

    fn document(&mut self) -> Result<Table, String> {
        let mut root = Table::new();
        let mut current: Vec<String> = Vec::new();
        loop {
            self.skip_spaces();
            match self.peek() {
                None => return Ok(root),
                Some(b'#') => {
                    self.comment();
                }
                Some(b'[') => {
                    let array = self.peek_at(1) == Some(b'[');
                    self.pos += if array { 2 } else { 1 };
                    let path = self.key()?;
                    let close = if array { "]]" } else { "]" };
                    if !self.starts_with(close) {
                        return Err(format!("expected {close:?} to close the table header"));
                    }
                    self.pos += close.len();
                    if array {
                        let (last, parents) = path.split_last().expect("non-empty key");
                        let parent = table_at(&mut root, parents)?;
                        match parent.iter_mut().find(|(k, _)| k == last) {
                            Some((_, Value::Array(items))) => items.push(Value::Table(Vec::new())),
                            Some(_) => return Err(format!("{last:?} is not an array of tables")),
                            None => parent
                                .push((last.clone(), Value::Array(vec![Value::Table(Vec::new())]))),
                        }
                    } else {
                        table_at(&mut root, &path)?;
                    }
                    current = path;
                    self.end_of_line()?;
                    continue;
                }
                Some(_) => {
                    if self.newline() {
                        continue;
                    }
                    let key = self.key()?;
                    if self.peek() != Some(b'=') {
                        return Err("expected \"=\" after the key".into());
                    }
                    self.pos += 1;
                    self.skip_spaces();
                    let value = self.value()?;
                    let table = table_at(&mut root, &current)?;
                    insert(table, &key, value)?;
                }
            }
            self.end_of_line()?;
        }
    }

    /// A dotted key, with the spaces around it.
    fn key(&mut self) -> Result<Vec<String>, String> {
        let mut parts = Vec::new();
        loop {
            self.skip_spaces();
            let part = match self.peek() {
                Some(b'"') => self.basic_string()?,
                Some(b'\'') => self.literal_string()?,
                _ => {
                    let start = self.pos;
                    while let Some(b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-') =
                        self.peek()
                    {
                        self.pos += 1;
                    }
                    if start == self.pos {
                        return Err("expected a key".into());
                    }
                    String::from_utf8_lossy(&self.text[start..self.pos]).into_owned()
                }
            };
            parts.push(part);
            self.skip_spaces();
            if self.peek() != Some(b'.') {
                return Ok(parts);
            }
            self.pos += 1;
        }
    }

    fn value(&mut self) -> Result<Value, String> {
        match self.peek() {
            Some(b'"') if self.starts_with("\"\"\"") => self.multiline_basic().map(Value::String),
            Some(b'"') => self.basic_string().map(Value::String),
            Some(b'\'') if self.starts_with("'''") => self.multiline_literal().map(Value::String),
            Some(b'\'') => self.literal_string().map(Value::String),
            Some(b'[') => self.array(),
            Some(b'{') => self.inline_table(),
            _ => self.bare_value(),
        }
    }

    /// `true`, `false`, a number or a date.
    fn bare_value(&mut self) -> Result<Value, String> {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if matches!(c, b' ' | b'\t' | b'\r' | b'\n' | b',' | b']' | b'}' | b'#') {
                break;
            }
            self.pos += 1;
        }
        let token = String::from_utf8_lossy(&self.text[start..self.pos]).into_owned();
        match token.as_str() {
            "" => Err("expected a value".into()),
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            "inf" | "+inf" | "-inf" | "nan" | "+nan" | "-nan" => Ok(Value::Other(token)),
            _ if token.starts_with(|c: char| c.is_ascii_digit() || c == '+' || c == '-') => {
                Ok(Value::Other(token))
            }
            _ => Err(format!("invalid value {token:?}")),
        }
    }

    fn array(&mut self) -> Result<Value, String> {
        self.pos += 1;
        let mut items = Vec::new();
        loop {
            self.skip_blank();
            if self.peek() == Some(b']') {
                self.pos += 1;
                return Ok(Value::Array(items));
            }
            items.push(self.value()?);
            self.skip_blank();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b']') => {}
                _ => return Err("expected \",\" or \"]\" in the array".into()),
            }
        }
    }

    fn inline_table(&mut self) -> Result<Value, String> {
        self.pos += 1;
        let mut table = Table::new();
        self.skip_spaces();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(Value::Table(table));
        }
        loop {
            let key = self.key()?;
            if self.peek() != Some(b'=') {
                return Err("expected \"=\" after the key".into());
            }
            self.pos += 1;
            self.skip_spaces();
            let value = self.value()?;
            insert(&mut table, &key, value)?;
            self.skip_spaces();
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Value::Table(table));
                }
                _ => return Err("expected \",\" or \"}\" in the inline table".into()),
            }
        }
    }

    fn literal_string(&mut self) -> Result<String, String> {
        self.pos += 1;
        let start = self.pos;
        loop {
            match self.peek() {
                Some(b'\'') => break,
                None | Some(b'\n') => return Err("unterminated string".into()),
                Some(_) => self.pos += 1,
            }
        }
        let s = String::from_utf8_lossy(&self.text[start..self.pos]).into_owned();
        self.pos += 1;
        Ok(s)
    }

    fn multiline_literal(&mut self) -> Result<String, String> {
        self.pos += 3;
        self.newline();
        let start = self.pos;
        loop {
            if self.starts_with("'''") {
                // Up to two quotes right before the closing ones belong to the string.
                let mut end = self.pos;
                while self.text.get(end + 3) == Some(&b'\'') && end < self.pos + 2 {
                    end += 1;
                }
                let s = String::from_utf8_lossy(&self.text[start..end]).into_owned();
                self.pos = end + 3;
                return Ok(s);
            }
            if self.peek().is_none() {
                return Err("unterminated string".into());
            }
            if !self.newline() {
                self.pos += 1;
            }
        }
    }

    fn basic_string(&mut self) -> Result<String, String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => self.escape(&mut out)?,
                None | Some(b'\n') | Some(b'\r') => return Err("unterminated string".into()),
                Some(_) => self.utf8_char(&mut out),
            }
        }
    }

    fn multiline_basic(&mut self) -> Result<String, String> {
        self.pos += 3;
        self.newline();
        let mut out = String::new();
        loop {
            if self.starts_with("\"\"\"") {
                let mut extra = 0;
                while self.peek_at(3 + extra) == Some(b'"') && extra < 2 {
                    extra += 1;
                }
                out.extend(std::iter::repeat('"').take(extra));
                self.pos += 3 + extra;
                return Ok(out);
            }
            match self.peek() {
                None => return Err("unterminated string".into()),
                Some(b'\\') => {
                    // A backslash ending a line trims the newline and the blanks after it.
                    let mut look = self.pos + 1;
                    while let Some(b' ' | b'\t') = self.text.get(look) {
                        look += 1;
                    }
                    let at_eol = matches!(self.text.get(look), Some(b'\n'))
                        || (self.text.get(look) == Some(&b'\r')
                            && self.text.get(look + 1) == Some(&b'\n'));
                    if at_eol {
                        self.pos = look;
                        loop {
                            self.skip_spaces();
                            if !self.newline() {
                                break;
                            }
                        }
                    } else {
                        self.escape(&mut out)?;
                    }
                }
                Some(_) => {
                    if self.newline() {
                        out.push('\n');
                    } else {
                        self.utf8_char(&mut out);
                    }
                }
            }
        }
    }

    /// One (possibly multi-byte) character, copied. The text came from a `str`, so the lead
    /// byte gives the length.
    fn utf8_char(&mut self, out: &mut String) {
        let len = match self.text[self.pos] {
            0..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            _ => 4,
        };
        let end = (self.pos + len).min(self.text.len());
        out.push_str(&String::from_utf8_lossy(&self.text[self.pos..end]));
        self.pos = end;
    }

    fn escape(&mut self, out: &mut String) -> Result<(), String> {
        let c = self.peek_at(1).ok_or("unterminated string")?;
        self.pos += 2;
        let simple = match c {
            b'b' => Some('\u{8}'),
            b't' => Some('\t'),
            b'n' => Some('\n'),
            b'f' => Some('\u{c}'),
            b'r' => Some('\r'),
            b'e' => Some('\u{1b}'),
            b'"' => Some('"'),
            b'\\' => Some('\\'),
            _ => None,
        };
        if let Some(ch) = simple {
            out.push(ch);
            return Ok(());
        }
        let digits = match c {
            b'x' => 2,
            b'u' => 4,
            b'U' => 8,
            _ => return Err(format!("invalid escape \"\\{}\"", c as char)),
        };
        let hex = self
            .text
            .get(self.pos..self.pos + digits)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32)
            .ok_or("invalid unicode escape")?;
        self.pos += digits;
        out.push(hex);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Value {
        Value::String(v.into())
    }

    #[test]
    fn tables_arrays_of_tables_and_dotted_keys() {
        let doc = parse(
            "top = \"t\" # comment\n\n[[a]]\n  x = 1\n[a.sub]\n  y = true\n[[a]]\nx = 2\n\
             [b.c]\nd.e = 'lit'\n",
        )
        .unwrap();
        assert_eq!(get(&doc, "top"), Some(&s("t")));
        let a = match get(&doc, "a") {
            Some(Value::Array(items)) => items,
            other => panic!("{other:?}"),
        };
        assert_eq!(a.len(), 2);
        assert_eq!(
            a[0],
            Value::Table(vec![
                ("x".into(), Value::Other("1".into())),
                (
                    "sub".into(),
                    Value::Table(vec![("y".into(), Value::Bool(true))])
                ),
            ])
        );
        let b = match get(&doc, "b") {
            Some(Value::Table(t)) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            b,
            &vec![(
                "c".into(),
                Value::Table(vec![(
                    "d".into(),
                    Value::Table(vec![("e".into(), s("lit"))])
                )])
            )]
        );
    }

    #[test]
    fn every_string_form_and_escape() {
        let doc = parse(concat!(
            "a = \"tab\\there \\\"q\\\" \\u00e9 \\U0001F600 back\\\\slash\"\n",
            "b = 'C:\\no\\escapes'\n",
            "c = \"\"\"\nline1\nline2 \\\n    joined\"\"\"\n",
            "d = '''\nraw \\n '' ok'''\n",
            "e = \"\"\"ends with quotes\"\"\"\"\"\n",
            "\"quoted key\" = \"\"\n",
            "f = \"caf\u{e9}\"\r\n",
        ))
        .unwrap();
        assert_eq!(get(&doc, "a"), Some(&s("tab\there \"q\" é 😀 back\\slash")));
        assert_eq!(get(&doc, "b"), Some(&s("C:\\no\\escapes")));
        assert_eq!(get(&doc, "c"), Some(&s("line1\nline2 joined")));
        assert_eq!(get(&doc, "d"), Some(&s("raw \\n '' ok")));
        assert_eq!(get(&doc, "e"), Some(&s("ends with quotes\"\"")));
        assert_eq!(get(&doc, "quoted key"), Some(&s("")));
        assert_eq!(get(&doc, "f"), Some(&s("café")));
    }

    #[test]
    fn arrays_inline_tables_numbers_and_dates_are_read_or_skipped() {
        let doc = parse(
            "a = [\n  \"x\", # one\n  [1, 2.5, -3],\n  { k = \"v\", n.m = false },\n]\n\
             when = 1979-05-27T07:32:00Z\nbig = 1_000\nempty = []\nnone = {}\n",
        )
        .unwrap();
        assert_eq!(
            get(&doc, "a"),
            Some(&Value::Array(vec![
                s("x"),
                Value::Array(vec![
                    Value::Other("1".into()),
                    Value::Other("2.5".into()),
                    Value::Other("-3".into())
                ]),
                Value::Table(vec![
                    ("k".into(), s("v")),
                    (
                        "n".into(),
                        Value::Table(vec![("m".into(), Value::Bool(false))])
                    ),
                ]),
            ]))
        );
        assert_eq!(
            get(&doc, "when"),
            Some(&Value::Other("1979-05-27T07:32:00Z".into()))
        );
        assert_eq!(get(&doc, "empty"), Some(&Value::Array(vec![])));
        assert_eq!(get(&doc, "none"), Some(&Value::Table(vec![])));
    }

    #[test]
    fn malformed_input_names_the_line() {
        for (text, line, why) in [
            ("a = \"open\n", 1, "unterminated string"),
            ("ok = 1\nb = \n", 2, "expected a value"),
            ("ok = 1\n\nc = yes\n", 3, "invalid value \"yes\""),
            ("d = 1 2\n", 1, "unexpected text"),
            ("[e\n", 1, "expected \"]\""),
            ("f = 1\nf = 2\n", 2, "duplicate key \"f\""),
            ("g = [1 2]\n", 1, "expected \",\" or \"]\""),
            ("= 1\n", 1, "expected a key"),
            ("h = \"\\q\"\n", 1, "invalid escape"),
            ("i = 1\n[i]\n", 2, "\"i\" is not a table"),
            ("j = 1\n[[j]]\n", 2, "not an array of tables"),
            ("k\n", 1, "expected \"=\""),
        ] {
            let err = parse(text).unwrap_err();
            assert!(
                err.starts_with(&format!("line {line}: ")) && err.contains(why),
                "{text:?}: {err}"
            );
        }
    }
}
