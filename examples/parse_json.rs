//! Prints pg_query's parse tree of the SQL given as argument, as JSON (for writing policy rules).
fn main() {
    let sql = std::env::args().nth(1).expect("usage: parse_json SQL");
    match pg_query::parse(&sql, 0) {
        Ok(r) => println!("{}", serde_json::to_string_pretty(&r.protobuf).unwrap()),
        Err(e) => eprintln!("parse error: {e}"),
    }
}
