//! Who belongs to a mesh, through the CLI: members listed, removed and refused, messages for them
//! returned to their senders, roles and invites that take effect at once, leaving, handing a mesh
//! over. Real daemons and a real broker.

use mesh_testkit::{BrokerProcess, TestHome};

use super::*;

/// Members of mesh "team" on `broker`, named `names`; the first creates it (its owner).
fn team_of(broker: &BrokerProcess, names: &[&str]) -> Vec<TestHome> {
    let homes: Vec<TestHome> = names
        .iter()
        .map(|name| {
            let home = TestHome::new(MESH);
            home.ok(&["init", "--name", name]);
            home.ok(&["daemon", "up", "--no-embedded"]);
            home
        })
        .collect();
    homes[0].ok(&["create", "team", "--broker", &broker.url]);
    let uses = (names.len() - 1).to_string();
    let token = homes[0].ok(&["invite", "--uses", &uses]).trim().to_owned();
    for home in &homes[1..] {
        home.ok(&["join", &token]);
    }
    for home in &homes {
        for name in names {
            wait_for_peer(home, name);
        }
    }
    homes
}

/// A broker and three members of mesh "team": alice (owner), bob and carol.
fn team_of_three(broker: &BrokerProcess) -> (TestHome, TestHome, TestHome) {
    let [alice, bob, carol] = <[TestHome; 3]>::try_from(team_of(broker, &["alice", "bob", "carol"])).ok().expect("3");
    (alice, bob, carol)
}

/// Every mesh key `home`'s daemon holds, read from its database file (the test reads what is on the
/// member's disk, as someone holding the machine would).
fn keys_on_disk(home: &TestHome) -> Vec<(u64, [u8; 32])> {
    let db =
        rusqlite::Connection::open_with_flags(home.paths().daemon_db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open daemon.db");
    let mut stmt = db.prepare("SELECT epoch, key FROM mesh_keys ORDER BY epoch").expect("query");
    stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, Vec<u8>>(1)?)))
        .expect("rows")
        .map(|r| {
            let (epoch, key) = r.expect("row");
            (epoch, key.try_into().expect("32 bytes"))
        })
        .collect()
}

/// The envelope of the message with `body` as `home`'s daemon received it (the real ciphertext).
fn received_envelope(home: &TestHome, body: &str) -> mesh_proto::wire::Envelope {
    let db =
        rusqlite::Connection::open_with_flags(home.paths().daemon_db(), rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("open daemon.db");
    let raw: String =
        db.query_row("SELECT raw FROM inbox WHERE body = ?1", [body], |r| r.get(0)).expect("the received row");
    match mesh_proto::wire::decode_server(&raw).expect("a deliver frame") {
        mesh_proto::wire::ServerFrame::Deliver(d) => match d.item {
            mesh_proto::wire::DeliveryItem::Message(env) => env,
            other => panic!("not a message: {other:?}"),
        },
        other => panic!("not a delivery: {other:?}"),
    }
}

/// Whether any of `keys` opens `env`'s ciphertext.
fn opens(env: &mesh_proto::wire::Envelope, keys: &[(u64, [u8; 32])]) -> bool {
    keys.iter().any(|(_, k)| {
        mesh_proto::crypto::secretbox_open(&mesh_proto::crypto::GroupKey::from_bytes(*k), &env.nonce, &env.ciphertext)
            .is_ok()
    })
}

fn key_epoch(home: &TestHome) -> u64 {
    home.json(&["meshes"])[0]["key_epoch"].as_u64().expect("key_epoch")
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
    // Nothing goes out from a mesh she is no longer in, and she is told why and what to do.
    let refused = carol.fails(&["send", "bob", "let me back", "--json"], 1);
    let v: Value = serde_json::from_str(&refused).expect("JSON error");
    assert_eq!(v["error"]["code"], "forbidden", "{v}");
    assert!(v["error"]["hint"].as_str().is_some_and(|h| h.contains("mesh join")), "{v}");
    wait_for_members(&alice, &["alice", "bob"]);
    // A new invite lets her back in, afresh; `mesh join` on this home, which still has the mesh.
    let token = alice.ok(&["invite"]).trim().to_owned();
    carol.ok(&["join", &token]);
    wait_for_members(&alice, &["alice", "bob", "carol"]);
    carol.eventually_json("carol back online", &["daemon", "status"], |s| {
        s["meshes"][0]["connection"]["state"] == "online"
    });
    alice.ok(&["remove", "carol"]);
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

#[test]
fn a_removed_member_s_old_key_opens_nothing_sent_after_and_a_member_away_reads_it() {
    let broker = BrokerProcess::start(MESH);
    let [alice, bob, carol, dave] =
        <[TestHome; 4]>::try_from(team_of(&broker, &["alice", "bob", "carol", "dave"])).ok().expect("4");
    alice.ok(&["send", "*", "before carol left", "--wait", "delivered"]);
    dave.ok(&["daemon", "down"]);
    let removed = alice.json(&["remove", "carol"]);
    assert_eq!(removed["key_epoch"], 1, "{removed}");
    alice.ok(&["send", "*", "after carol left", "--wait", "accepted"]);
    wait_for_message(&bob, "after carol left");
    // Carol's daemon kept every key it had; none opens the real ciphertext sent after her removal,
    // while bob's current key does.
    let carol_keys = keys_on_disk(&carol);
    assert_eq!(carol_keys.iter().map(|(e, _)| *e).collect::<Vec<_>>(), [0], "carol never got epoch 1");
    let after = received_envelope(&bob, "after carol left");
    assert!(!opens(&after, &carol_keys), "carol's old key opens what was sent after the new key");
    let bob_keys = keys_on_disk(&bob);
    assert!(opens(&after, &bob_keys[1..]), "bob's new key opens it");
    assert!(opens(&received_envelope(&bob, "before carol left"), &carol_keys), "what came before, she could read");
    // Dave was away during all that: he gets the new key with his queue, and reads it.
    dave.ok(&["daemon", "up", "--no-embedded"]);
    wait_for_message(&dave, "after carol left");
    assert_eq!(key_epoch(&dave), 1);
    let watched = dave.ok(&["watch", "--replay", "--no-follow"]);
    assert!(watched.contains("gave the mesh a new key (epoch 1)"), "{watched}");
}

#[test]
fn two_admins_removing_at_once_converge_on_one_key_neither_removed_member_holds() {
    let broker = BrokerProcess::start(MESH);
    let [alice, bob, carol, dave, erin] =
        <[TestHome; 5]>::try_from(team_of(&broker, &["alice", "bob", "carol", "dave", "erin"])).ok().expect("5");
    alice.ok(&["role", "bob", "admin"]);
    bob.eventually_json("bob an admin", &["meshes"], |v| v[0]["role"] == "admin");
    std::thread::scope(|s| {
        s.spawn(|| alice.ok(&["remove", "carol"]));
        s.spawn(|| bob.ok(&["remove", "dave"]));
    });
    // Every member that remains ends on one epoch; the broker wants no further key.
    let epoch = mesh_testkit::eventually("one key for alice, bob and erin", mesh_testkit::WAIT, || {
        let epochs = [key_epoch(&alice), key_epoch(&bob), key_epoch(&erin)];
        (epochs[0] >= 1 && epochs.iter().all(|e| *e == epochs[0])).then_some(epochs[0])
    });
    wait_for_members(&erin, &["alice", "bob", "erin"]);
    alice.ok(&["send", "*", "after both left", "--wait", "delivered"]);
    wait_for_message(&erin, "after both left");
    let after = received_envelope(&erin, "after both left");
    for (name, home) in [("carol", &carol), ("dave", &dave)] {
        let held = keys_on_disk(home);
        assert!(
            held.iter().all(|(e, _)| *e < epoch),
            "{name} holds epoch {epoch}: {:?}",
            held.iter().map(|(e, _)| e).collect::<Vec<_>>()
        );
        assert!(!opens(&after, &held), "{name}'s keys open what was sent after both removals");
    }
    assert_eq!((key_epoch(&alice), key_epoch(&bob), key_epoch(&erin)), (epoch, epoch, epoch), "still one key");
}

#[test]
fn the_owner_deletes_the_mesh_and_the_others_are_cut_off_and_can_forget_it() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob, _carol) = team_of_three(&broker);
    assert_eq!(error_code(&bob, &["mesh", "delete", "--yes"]), "forbidden");
    assert!(alice.fails(&["mesh", "delete"], 2).contains("--yes"));
    alice.ok(&["mesh", "delete", "--yes"]);
    assert!(alice.json(&["meshes"]).as_array().expect("array").is_empty());
    let status = bob
        .eventually_json("bob cut off", &["daemon", "status"], |s| s["meshes"][0]["connection"]["state"] == "rejected");
    let why = status["meshes"][0]["connection"]["last_error"].as_str().expect("why").to_owned();
    assert!(why.contains("deleted by its owner alice"), "{why}");
    bob.ok(&["leave", "--yes"]);
    assert!(bob.json(&["meshes"]).as_array().expect("array").is_empty());
}

#[test]
fn a_member_restored_from_a_backup_older_than_the_mesh_key_asks_for_it_and_gets_a_new_one() {
    let broker = BrokerProcess::start(MESH);
    let [alice, bob] = <[TestHome; 2]>::try_from(team_of(&broker, &["alice", "bob"])).ok().expect("2");
    let file = bob.path().join("bob.backup");
    bob.ok(&["daemon", "backup", "--to", file.to_str().expect("utf-8")]);
    alice.ok(&["mesh", "rotate-key"]);
    bob.eventually_json("bob at epoch 1", &["meshes"], |v| v[0]["key_epoch"] == 1);
    // Bob's machine goes back to the backup: it holds epoch 0 only, and no grant of epoch 1 will
    // come again (it was taken). His daemon asks; alice's makes a key for everyone.
    bob.ok(&["daemon", "down"]);
    bob.ok(&["daemon", "restore", "--from", file.to_str().expect("utf-8")]);
    bob.ok(&["daemon", "up", "--no-embedded"]);
    assert_eq!(key_epoch(&bob), 0);
    bob.eventually_json("bob given a new key", &["meshes"], |v| v[0]["key_epoch"].as_u64().is_some_and(|e| e >= 2));
    alice.ok(&["send", "*", "for bob, restored", "--wait", "delivered"]);
    wait_for_message(&bob, "for bob, restored");
    // The owner's own daemon, restored the same way, makes the new key itself.
    let file = alice.path().join("alice.backup");
    alice.ok(&["daemon", "backup", "--to", file.to_str().expect("utf-8")]);
    alice.ok(&["mesh", "rotate-key"]);
    let current = key_epoch(&alice);
    alice.ok(&["daemon", "down"]);
    alice.ok(&["daemon", "restore", "--from", file.to_str().expect("utf-8")]);
    alice.ok(&["daemon", "up", "--no-embedded"]);
    alice.eventually_json("alice past her lost key", &["meshes"], |v| {
        v[0]["key_epoch"].as_u64().is_some_and(|e| e > current)
    });
    alice.ok(&["send", "*", "from alice, restored", "--wait", "delivered"]);
    wait_for_message(&bob, "from alice, restored");
}
