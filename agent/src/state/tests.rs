use std::sync::Arc;

use super::*;

fn labels(app: &str) -> Labels {
    Labels::from([("app".to_owned(), app.to_owned())])
}

#[test]
fn label_sets_share_equal_labels_and_forget_the_ones_no_pod_holds() {
    let mut sets = LabelSets::default();
    let web = sets.intern(labels("web"));
    assert!(Arc::ptr_eq(&web, &sets.intern(labels("web"))));
    // Sets of pods that are gone are dropped at a pruning, when the interner has grown.
    for n in 0..LabelSets::FIRST_PRUNING {
        drop(sets.intern(labels(&format!("gone-{n}"))));
    }
    let after = sets.intern(labels("new"));
    assert!(
        sets.len() < 10,
        "{} sets kept; only those pods hold should stay",
        sets.len()
    );
    assert!(Arc::ptr_eq(&web, &sets.intern(labels("web"))));
    assert!(Arc::ptr_eq(&after, &sets.intern(labels("new"))));
}
