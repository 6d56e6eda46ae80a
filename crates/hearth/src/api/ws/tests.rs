//! The hub's dispatch, seats and dedupe.

use super::*;

/// A hub on the embedded fan-out, with 3 seats, 1 per house.
fn hub() -> Hub {
    let limits = SeatLimits {
        total: 3,
        per_house: 1,
    };
    Hub::new(
        Arc::new(crate::embedded::memory::ChannelFanOut::default()),
        8,
        limits,
    )
}

#[test]
fn a_resync_goes_to_every_client_that_follows_alerts() {
    let hub = hub();
    let sub = |alerts| Subscription {
        house: Some("h1".into()),
        events: true,
        alerts,
    };
    let (tx_alerts, mut alerts) = mpsc::channel(8);
    let (tx_events, mut events) = mpsc::channel(8);
    hub.add(vec![sub(true)], tx_alerts);
    hub.add(vec![sub(false)], tx_events);
    hub.dispatch(RESYNC);
    assert_eq!(alerts.try_recv().as_deref().ok(), Some(RESYNC));
    assert!(events.try_recv().is_err());
    // Anything else without a house goes nowhere.
    hub.dispatch(r#"{"type":"mystery"}"#);
    assert!(alerts.try_recv().is_err());
}

#[test]
fn a_house_holds_its_share_of_the_seats_and_gives_them_back() {
    let hub = hub();
    let h1 = Principal::House("h1".into());
    let first = hub.seat(&h1).expect("a seat");
    assert!(matches!(hub.seat(&h1), Err(ApiError::Crowded(_))));
    let _h2 = hub.seat(&Principal::House("h2".into())).expect("h2's own");
    let _admin = hub.seat(&Principal::Admin).expect("admin: not per house");
    assert!(matches!(
        hub.seat(&Principal::Admin),
        Err(ApiError::Unavailable(_))
    ));
    drop(first);
    assert!(hub.seat(&h1).is_ok(), "given back");
}

#[test]
fn seq_is_read_off_the_front() {
    let mut last = 5;
    assert!(!fresh(
        &mut last,
        r#"{"seq":5,"type":"alert","house_id":"h"}"#
    ));
    assert!(fresh(
        &mut last,
        r#"{"seq":6,"type":"alert","house_id":"h"}"#
    ));
    assert_eq!(last, 6);
    assert!(fresh(
        &mut last,
        r#"{"type":"events","house_id":"h","events":[]}"#
    ));
    assert_eq!(last, 6);
    // A resync starts over: pushes numbered anew go out.
    assert!(fresh(&mut last, RESYNC));
    assert!(fresh(
        &mut last,
        r#"{"seq":1,"type":"alert","house_id":"h"}"#
    ));
}
