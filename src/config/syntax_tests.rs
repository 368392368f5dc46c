//! White-box tests of the parser and include handling (in-memory files).

use super::*;
use crate::config::source::{MemLoader, NoIncludes};

fn parse(text: &str) -> Document {
    parse_document("t.conf", text, Path::new(""), None, &mut NoIncludes)
}

fn ok(text: &str) -> Vec<Item> {
    let doc = parse(text);
    assert!(doc.errors.is_empty(), "{:?}", doc.errors);
    doc.items
}

/// The first error as (line, col, message).
fn first_err(doc: &Document) -> (u32, u32, String) {
    let (span, msg) = doc.errors.first().cloned().expect("an error");
    (span.line, span.col, msg)
}

fn scope(item: &Item) -> &Scope {
    match item {
        Item::Scope(s) => s,
        Item::Assign { .. } => panic!("expected a scope, got {item:?}"),
    }
}

fn assign(item: &Item) -> (&str, &Value) {
    match item {
        Item::Assign { key, value } => (&key.node, &value.node),
        Item::Scope(_) => panic!("expected an assignment, got {item:?}"),
    }
}

fn words(list: &Value) -> Vec<&str> {
    match list {
        Value::List(v) => v.iter().filter_map(|e| e.node.scalar()).collect(),
        other => panic!("not a list: {other:?}"),
    }
}

#[test]
fn scopes_with_and_without_argument() {
    let items = ok("a { }\nb \"x\" { c { } }; d word { }");
    assert_eq!(items.len(), 3);
    assert_eq!(scope(&items[0]).name.node, "a");
    let b = scope(&items[1]);
    assert_eq!(b.arg.as_ref().map(|a| a.node.as_str()), Some("x"));
    assert_eq!(scope(&b.items[0]).name.node, "c");
    assert_eq!(
        scope(&items[2]).arg.as_ref().map(|a| a.node.as_str()),
        Some("word")
    );
}

#[test]
fn assignments_with_optional_semicolons() {
    let items = ok("s { a = 1; b = \"two\"\n c = three;; }");
    let s = scope(&items[0]);
    let got: Vec<_> = s.items.iter().map(assign).collect();
    assert_eq!(
        got,
        vec![
            ("a", &Value::Word("1".into())),
            ("b", &Value::Str("two".into())),
            ("c", &Value::Word("three".into())),
        ]
    );
}

#[test]
fn lists_with_and_without_commas_and_nesting() {
    let items = ok("s { a = ( x, y z ,) b = ( ) c = ( (1) [k = v] ) }");
    let s = scope(&items[0]);
    assert_eq!(words(assign(&s.items[0]).1), vec!["x", "y", "z"]);
    assert_eq!(words(assign(&s.items[1]).1), Vec::<&str>::new());
    match assign(&s.items[2]).1 {
        Value::List(v) => assert_eq!(v.len(), 2),
        other => panic!("{other:?}"),
    }
}

#[test]
fn dictionaries_with_separators_keep_order_and_spans() {
    let items = ok("s {\n d = [ n1 = \"a\", \"n 2\" = b; n3 = ( 1 ) ]\n}");
    let (_, d) = assign(&scope(&items[0]).items[0]);
    let Value::Dict(entries) = d else {
        panic!("{d:?}")
    };
    let keys: Vec<_> = entries.iter().map(|(k, _)| k.node.as_str()).collect();
    assert_eq!(keys, vec!["n1", "n 2", "n3"]);
    assert_eq!((entries[1].0.span.line, entries[1].0.span.col), (2, 18));
}

#[test]
fn value_spans_point_at_the_value() {
    let items = ok("s {\n  port = 99\n}");
    let Item::Assign { key, value } = &scope(&items[0]).items[0] else {
        panic!()
    };
    assert_eq!((key.span.line, key.span.col), (2, 3));
    assert_eq!((value.span.line, value.span.col), (2, 10));
}

#[test]
fn syntax_errors_are_located() {
    let cases: &[(&str, u32, u32, &str)] = &[
        ("s {\n a = 1\n", 1, 3, "unclosed `{` of scope `s`"),
        ("s { a = ( 1 2\n}", 2, 1, "close the list opened at 1:9"),
        ("s { a = ( 1 2", 1, 9, "unclosed `(`"),
        ("s { a = [ k = 1\n", 1, 9, "unclosed `[`"),
        (
            "s { a = [ k 1 ] }",
            1,
            13,
            "expected `=` after dictionary key `k`",
        ),
        ("s { a = }", 1, 9, "expected a value, found `}`"),
        ("s { a 1 2 }", 1, 7, "expected `=` between `a` and `1`"),
        ("s { a ; }", 1, 7, "expected `=` or `{` after `a`"),
        ("}", 1, 1, "no scope is open"),
        (
            "s { = 1 }",
            1,
            5,
            "expected an option name or a scope, found `=`",
        ),
        ("\"s\" { }", 1, 1, "found string \"s\""),
        ("s { a = [ ( ) ] }", 1, 11, "expected `key = value` or `]`"),
    ];
    for &(text, line, col, needle) in cases {
        let doc = parse(text);
        let (l, c, msg) = first_err(&doc);
        assert_eq!((l, c), (line, col), "{text:?}: {msg}");
        assert!(msg.contains(needle), "{text:?}: {msg:?} lacks {needle:?}");
    }
}

#[test]
fn lexical_errors_are_all_collected() {
    let doc = parse("s {\n a = \"x\n b = \"y\n}");
    assert_eq!(doc.errors.len(), 2, "{:?}", doc.errors);
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let deep = format!("s {{ a = {} }}", "(".repeat(10_000));
    assert!(first_err(&parse(&deep)).2.contains("nested deeper"));
    let scopes = "s { ".repeat(10_000);
    assert!(first_err(&parse(&scopes)).2.contains("nested deeper"));
}

fn mem(files: &[(&str, &str)]) -> MemLoader {
    let mut loader = MemLoader::default();
    for (path, text) in files {
        loader.files.insert(PathBuf::from(path), text.to_string());
    }
    loader
}

fn parse_mem(files: &[(&str, &str)], top: &str) -> Document {
    let mut loader = mem(files);
    let text = loader
        .files
        .get(Path::new(top))
        .cloned()
        .unwrap_or_default();
    let dir = Path::new(top).parent().unwrap_or(Path::new(""));
    let key = Some(PathBuf::from(top));
    parse_document(top, &text, dir, key, &mut loader)
}

#[test]
fn include_is_relative_to_the_including_file_and_spliced_in_place() {
    let doc = parse_mem(
        &[
            (
                "etc/main.conf",
                "a { x = 1\n include \"sub/b.conf\"\n y = 2 }",
            ),
            ("etc/sub/b.conf", "include \"../c.conf\"; z = 3"),
            ("etc/c.conf", "w = 4"),
        ],
        "etc/main.conf",
    );
    assert!(doc.errors.is_empty(), "{:?}", doc.errors);
    let keys: Vec<_> = scope(&doc.items[0])
        .items
        .iter()
        .map(|i| assign(i).0)
        .collect();
    assert_eq!(keys, vec!["x", "w", "z", "y"]);
    assert_eq!(
        doc.sources.read,
        vec![
            PathBuf::from("etc/sub/b.conf"),
            PathBuf::from("etc/sub/../c.conf")
        ]
    );
}

#[test]
fn include_cycle_is_an_error_at_the_include() {
    let doc = parse_mem(
        &[
            ("a.conf", "include \"b.conf\""),
            ("b.conf", "\n  include \"a.conf\""),
        ],
        "a.conf",
    );
    let (line, col, msg) = first_err(&doc);
    assert_eq!((line, col), (2, 11));
    assert!(
        msg.contains("include cycle: a.conf -> b.conf -> a.conf"),
        "{msg}"
    );
    assert_eq!(
        doc.sources.diag(doc.errors[0].0, String::new()).file,
        "b.conf"
    );
}

#[test]
fn self_include_and_depth_limit() {
    let doc = parse_mem(&[("a.conf", "include a.conf")], "a.conf");
    assert!(first_err(&doc).2.contains("include cycle"));
    let files: Vec<(String, String)> = (0..40)
        .map(|i| (format!("f{i}.conf"), format!("include \"f{}.conf\"", i + 1)))
        .collect();
    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let doc = parse_mem(&refs, "f0.conf");
    assert!(first_err(&doc).2.contains("nested deeper than 16"));
}

#[test]
fn missing_include_names_the_file() {
    let doc = parse_mem(
        &[("a.conf", "s { }\ninclude \"nope.conf\"\nt { }")],
        "a.conf",
    );
    let (line, col, msg) = first_err(&doc);
    assert_eq!((line, col), (2, 9));
    assert!(
        msg.contains("cannot read included file `nope.conf`"),
        "{msg}"
    );
    assert_eq!(doc.items.len(), 2, "parsing goes on after a bad include");
}

#[test]
fn a_scope_named_include_is_still_a_scope() {
    let items = ok("include \"x\" { }");
    assert_eq!(scope(&items[0]).name.node, "include");
}

#[test]
fn arbitrary_bytes_never_panic() {
    let samples = [
        "",
        "{",
        "}",
        "((((",
        "[[[[",
        "a = [ b = ( c",
        "a \"",
        "a = \"\\",
        "include",
        "include \"\"",
        "= = =",
        "a { b { c = [ d = e ] } } }",
        "\u{0}\u{ffff}\u{10ffff}",
        "a = (,,,)",
        "a = [;;,]",
        "a b c d",
        "a { include x { } }",
    ];
    for s in samples {
        let _ = parse(s);
    }
}

proptest::proptest! {
    #[test]
    fn never_panics_on_any_text(text in "\\PC{0,200}") {
        let _ = crate::config::parse_for_fuzz(&text);
    }

    #[test]
    fn never_panics_on_config_like_text(
        text in "[{}()\\[\\]=;,\"#\\\\\n a-z0-9.:_-]{0,300}"
    ) {
        let _ = crate::config::parse_for_fuzz(&text);
    }

    #[test]
    fn errors_point_inside_the_text(text in "[{}()\\[\\]=;,\"#\n ab1]{0,80}") {
        if let Err(err) = crate::config::parse_for_fuzz(&text) {
            let lines = u32::try_from(text.lines().count().max(1)).unwrap_or(u32::MAX);
            for d in err.diagnostics() {
                proptest::prop_assert!(d.line >= 1 && d.col >= 1);
                proptest::prop_assert!(d.line <= lines + 1, "{} in {:?}", d, text);
            }
        }
    }
}
