//! Who belongs to a mesh, through the CLI: members listed, removed and refused, messages for them
//! returned to their senders, roles and invites that take effect at once, leaving, handing a mesh
//! over. Real daemons and a real broker.

use mesh_testkit::{BrokerProcess, TestHome};

use super::*;

/// A broker and three members of mesh "team": alice (owner), bob and carol.
fn team_of_three(broker: &BrokerProcess) -> (TestHome, TestHome, TestHome) {
    let homes: Vec<TestHome> = ["alice", "bob", "carol"]
        .iter()
        .map(|name| {
            let home = TestHome::new(MESH);
            home.ok(&["init", "--name", name]);
            home.ok(&["daemon", "up", "--no-embedded"]);
            home
        })
        .collect();
    let [alice, bob, carol] = <[TestHome; 3]>::try_from(homes).ok().expect("three homes");
    alice.ok(&["create", "team", "--broker", &broker.url]);
    let token = alice.ok(&["invite", "--uses", "2"]).trim().to_owned();
    bob.ok(&["join", &token]);
    carol.ok(&["join", &token]);
    wait_for_peer(&alice, "bob");
    wait_for_peer(&alice, "carol");
    wait_for_peer(&bob, "carol");
    (alice, bob, carol)
}

fn names(members: &Value) -> Vec<String> {
    members.as_array().expect("array").iter().map(|m| m["name"].as_str().expect("name").to_owned()).collect()
}

/// Waits until `home` lists exactly `want` as the mesh's members (a change reaches it moments after
/// the command that made it returns).
fn wait_for_members(home: &TestHome, want: &[&str]) {
    home.eventually_json(&format!("members {want:?}"), &["members"], |v| names(v) == want);
}

/// The error code `mesh ARGS --json` failed with (exit 1).
fn error_code(home: &TestHome, args: &[&str]) -> String {
    let mut all = args.to_vec();
    all.push("--json");
    let err = home.fails(&all, 1);
    let v: Value = serde_json::from_str(&err).unwrap_or_else(|e| panic!("{e}: {err}"));
    v["error"]["code"].as_str().expect("code").to_owned()
}

#[test]
fn a_removed_member_is_cut_off_and_refused_and_its_messages_come_back_to_their_senders() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob, carol) = team_of_three(&broker);
    let session = bob.launch("bob-worker", Some("team"));
    alice.eventually_json("bob's session listed under him", &["members"], |v| {
        v.as_array().expect("array").iter().any(|m| {
            m["name"] == "bob" && m["sessions"].as_array().is_some_and(|s| s.iter().any(|s| s["name"] == "bob-worker"))
        })
    });
    let members = alice.json(&["members"]);
    let bob_row = members.as_array().expect("array").iter().find(|m| m["name"] == "bob").expect("bob");
    let alice_key = alice.json(&["daemon", "status"])["member"]["key"].clone();
    assert_eq!(bob_row["invited_by"], alice_key, "{bob_row}");
    assert_eq!(bob_row["role"], "member");
    assert!(bob_row["joined_at"].as_u64().is_some(), "{bob_row}");

    // A member may not remove anyone.
    assert_eq!(error_code(&bob, &["remove", "carol"]), "forbidden");
    // Carol is away; bob's message waits for her at the broker.
    carol.ok(&["daemon", "down"]);
    bob.ok(&["send", "carol", "for carol, who is away", "--wait", "accepted"]);
    let removed = alice.json(&["remove", "carol"]);
    assert_eq!(removed["name"], "carol");
    // Bob's message comes back as not delivered: she left the mesh (by removal) before taking it.
    let outbox = bob.eventually_json("the revoked receipt", &["outbox"], |v| {
        v.as_array().expect("array").iter().any(|r| r["revoked_count"] == 1)
    });
    let row = outbox.as_array().expect("array").iter().find(|r| r["revoked_count"] == 1).expect("row");
    assert_eq!(row["delivered_count"], 0, "{row}");
    let listed = bob.ok(&["outbox"]);
    assert!(listed.contains("not delivered: the recipient left the mesh"), "{listed}");
    // Everyone sees it: she is out of every roster, and the change is an event with who did it.
    for home in [&alice, &bob] {
        home.eventually_json("carol gone from the roster", &["peers"], |v| {
            !v.as_array().expect("array").iter().any(|p| p["name"] == "carol")
        });
    }
    let events = bob.ok(&["watch", "--replay", "--no-follow"]);
    assert!(events.contains("carol (") && events.contains("was removed by alice"), "{events}");
    assert_eq!(error_code(&bob, &["send", "carol", "again"]), "unknown_target");
    // Carol, back, is refused with the reason, and stays refused.
    carol.ok(&["daemon", "up", "--no-embedded"]);
    let status = carol.eventually_json("carol refused", &["daemon", "status"], |s| {
        s["meshes"][0]["connection"]["state"] == "rejected"
    });
    let why = status["meshes"][0]["connection"]["last_error"].as_str().expect("a reason").to_owned();
    assert!(why.starts_with("revoked: removed from this mesh"), "{why}");
    wait_for_members(&alice, &["alice", "bob"]);
    // Removing bob takes his live session with him.
    alice.ok(&["remove", "bob"]);
    bob.eventually_json("bob and his session refused", &["daemon", "status"], |s| {
        s["meshes"][0]["connection"]["state"] == "rejected"
    });
    bob.eventually_json("bob's session refused too", &["session", "list"], |v| {
        v.as_array().expect("array").iter().any(|s| s["name"] == "bob-worker" && s["connection"]["state"] == "rejected")
    });
    drop(session);
    wait_for_members(&alice, &["alice"]);
}

#[test]
fn roles_and_invites_take_effect_at_once_and_a_revoked_invite_is_refused() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob, carol) = team_of_three(&broker);
    assert_eq!(error_code(&bob, &["invite"]), "bad_request", "a member cannot invite");
    assert_eq!(error_code(&bob, &["invites"]), "forbidden");
    // Made an admin, bob invites and lists invites at once; no restart, no reconnect.
    alice.ok(&["role", "bob", "admin"]);
    bob.eventually_json("bob an admin here", &["meshes"], |v| v[0]["role"] == "admin");
    let minted = bob.json(&["invite", "--uses", "1"]);
    let id = minted["id"].as_str().expect("id").to_owned();
    let listed = alice.json(&["invites"]);
    let row = listed.as_array().expect("array").iter().find(|i| i["id"] == id.as_str()).expect("listed");
    assert_eq!(
        (row["issued_by_name"].as_str(), row["uses"].as_u64(), row["state"].as_str()),
        (Some("bob"), Some(0), Some("open"))
    );
    // Revoked, it lets no one in; the list says so.
    alice.ok(&["invite", "revoke", &id]);
    let dave = TestHome::new(MESH);
    dave.ok(&["init", "--name", "dave"]);
    dave.ok(&["daemon", "up", "--no-embedded"]);
    let err = dave.fails(&["join", minted["token"].as_str().expect("token")], 1);
    assert!(err.contains("invite_invalid") && err.contains("revoked"), "{err}");
    let all = alice.json(&["invites", "--all"]);
    let row = all.as_array().expect("array").iter().find(|i| i["id"] == id.as_str()).expect("listed");
    assert_eq!(row["state"], "revoked");
    assert!(alice.json(&["invites"]).as_array().expect("array").iter().all(|i| i["id"] != id.as_str()));
    assert_eq!(error_code(&alice, &["invite", "revoke", &"0".repeat(32)]), "not_found");
    // Demoted, bob loses it at once too.
    alice.ok(&["role", "bob", "member"]);
    bob.eventually_json("bob a member again", &["meshes"], |v| v[0]["role"] == "member");
    assert_eq!(error_code(&bob, &["invites"]), "forbidden");
    // An admin removes members but never the owner; only the owner changes roles.
    alice.ok(&["role", "carol", "admin"]);
    carol.eventually_json("carol an admin", &["meshes"], |v| v[0]["role"] == "admin");
    assert_eq!(error_code(&carol, &["remove", "alice"]), "forbidden");
    assert_eq!(error_code(&carol, &["role", "bob", "admin"]), "forbidden");
    carol.ok(&["remove", "bob"]);
    wait_for_members(&alice, &["alice", "carol"]);
}

#[test]
fn a_member_leaves_and_the_owner_hands_the_mesh_over_before_leaving() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob, carol) = team_of_three(&broker);
    // Leaving asks first; without a terminal it needs --yes.
    assert!(carol.fails(&["leave"], 2).contains("--yes"));
    carol.ok(&["daemon", "down"]);
    bob.ok(&["send", "carol", "before she leaves", "--wait", "accepted"]);
    carol.ok(&["daemon", "up", "--no-embedded"]);
    wait_for_message(&carol, "before she leaves");
    let left = carol.json(&["leave", "--yes"]);
    assert_eq!(left["change"], "leave");
    assert!(carol.json(&["meshes"]).as_array().expect("array").is_empty(), "forgotten here");
    assert_eq!(ready_bodies(&carol.json(&["inbox"])), ["before she leaves"], "what arrived stays");
    wait_for_members(&alice, &["alice", "bob"]);
    let watched = bob.ok(&["watch", "--replay", "--no-follow"]);
    assert!(watched.contains("carol (") && watched.contains("left the mesh"), "{watched}");

    // The owner cannot leave until someone else owns the mesh.
    let err = alice.fails(&["leave", "--yes"], 1);
    assert!(err.contains("hand ownership over"), "{err}");
    alice.ok(&["role", "bob", "owner"]);
    bob.eventually_json("bob owns it", &["meshes"], |v| v[0]["role"] == "owner");
    alice.eventually_json("alice is an admin", &["meshes"], |v| v[0]["role"] == "admin");
    alice.ok(&["leave", "--yes"]);
    wait_for_members(&bob, &["bob"]);
}
