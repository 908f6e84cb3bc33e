//! The fields in which two decoded sections differ.

use super::decode::{Fields, Step, Value};

/// One difference: the field's path, and its value on each side (None
/// where that side does not have the field at all).
#[derive(Clone, Debug, PartialEq)]
pub struct FieldDiff {
    pub path: Vec<Step<'static>>,
    pub a: Option<Value<'static>>,
    pub b: Option<Value<'static>>,
}

/// Every leaf value that differs between `a` and `b`, in `a`'s order (then
/// fields only `b` has). Structs and subsections are compared field by
/// field, arrays element by element; the values reported are the smallest
/// that differ.
pub fn diff(a: &Fields<'_>, b: &Fields<'_>) -> Vec<FieldDiff> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    maps(a, b, &mut path, &mut out);
    out
}

fn push(out: &mut Vec<FieldDiff>, path: &[Step<'static>], a: Option<&Value<'_>>, b: Option<&Value<'_>>) {
    out.push(FieldDiff {
        path: path.to_vec(),
        a: a.map(|v| v.clone().into_owned()),
        b: b.map(|v| v.clone().into_owned()),
    });
}

fn maps(a: &Fields<'_>, b: &Fields<'_>, path: &mut Vec<Step<'static>>, out: &mut Vec<FieldDiff>) {
    for (name, va) in &a.entries {
        path.push(Step::Name(name.clone().into_owned().into()));
        match b.get(name) {
            Some(vb) => values(va, vb, path, out),
            None => push(out, path, Some(va), None),
        }
        path.pop();
    }
    for (name, vb) in &b.entries {
        if a.get(name).is_none() {
            path.push(Step::Name(name.clone().into_owned().into()));
            push(out, path, None, Some(vb));
            path.pop();
        }
    }
}

fn values(a: &Value<'_>, b: &Value<'_>, path: &mut Vec<Step<'static>>, out: &mut Vec<FieldDiff>) {
    match (a, b) {
        (Value::Map(ma), Value::Map(mb)) => maps(ma, mb, path, out),
        (Value::List(la), Value::List(lb)) => {
            for i in 0..la.len().max(lb.len()) {
                path.push(Step::Index(i as u64));
                match (la.get(i), lb.get(i)) {
                    (Some(x), Some(y)) => values(x, y, path, out),
                    (x, y) => push(out, path, x, y),
                }
                path.pop();
            }
        }
        _ if a == b => {}
        _ => push(out, path, Some(a), Some(b)),
    }
}
