//! Tests of the RESP2 reader of `spubsub`.

use super::*;

#[test]
fn frames_parse_whole_or_not_at_all() {
    let push = b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n";
    let (frame, used) = parse(push).expect("valid").expect("complete");
    assert_eq!(used, push.len());
    assert_eq!(
        frame,
        Frame::Array(vec![
            Frame::Bulk(Some(b"smessage".to_vec())),
            Frame::Bulk(Some(b"ch".to_vec())),
            Frame::Bulk(Some(b"hello".to_vec())),
        ])
    );
    for cut in 0..push.len() {
        assert_eq!(parse(&push[..cut]).expect("valid"), None, "cut at {cut}");
    }
    assert_eq!(
        parse(b"-MOVED 12 127.0.0.1:7001\r\n").expect("valid"),
        Some((Frame::Error("MOVED 12 127.0.0.1:7001".to_owned()), 26))
    );
    assert_eq!(parse(b":3\r\n").expect("valid"), Some((Frame::Int(3), 4)));
    assert_eq!(parse(b"$-1\r\n").expect("valid"), Some((Frame::Bulk(None), 5)));
    assert!(parse(b"?x\r\n").is_err());
    assert!(parse(b"*99999999999\r\n").is_err());
}
