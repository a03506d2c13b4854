//! The users and organizations API over real TCP on 127.0.0.1:0, each test with its own temporary data directory.
//! Every response body is checked for a password hash (`$argon2`) by the client itself.

#![allow(clippy::unwrap_used, reason = "tests")]

mod support;

use serde_json::{Value, json};
use support::Server;

impl Server {
    /// One HTTP/1.1 request over a fresh connection; the status and the body as JSON (Null if none). Fails the
    /// test if the body holds a password hash.
    async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let body = body.map(|b| b.to_string());
        let answer = self.raw(method, path, token, body.as_deref()).await;
        assert!(
            !answer.body.contains("$argon2") && !answer.body.contains("password_hash"),
            "{method} {path} leaked a password hash: {}",
            answer.body
        );
        (answer.status, answer.json())
    }

    async fn login_as(&self, user: &str, password: &str, org: Option<&str>) -> (u16, Value) {
        let mut body = json!({ "username": user, "password": password });
        if let Some(org) = org {
            body["organization_name"] = json!(org);
        }
        self.request("POST", "/api/auth/login", None, Some(body)).await
    }

    async fn token(&self, user: &str, password: &str) -> String {
        let (status, body) = self.login_as(user, password, None).await;
        assert_eq!(status, 200, "login {user}: {body}");
        body["token"].as_str().unwrap().to_owned()
    }

    async fn admin(&self) -> String {
        self.token("Admin", "Admin").await
    }

    /// Registers `name` (password `<name>-pw`) as Admin; returns the answer.
    async fn register(&self, admin: &str, name: &str, extra: Value) -> (u16, Value) {
        let mut body = json!({ "name": name, "password": format!("{name}-pw") });
        if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
            b.extend(e);
        }
        self.request("POST", "/api/auth/register", Some(admin), Some(body))
            .await
    }
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn admin_registers_and_only_admin_may() {
    let server = Server::fresh().await;
    let admin = server.admin().await;
    let (status, bob) = server
        .register(&admin, "bob", json!({ "email": "bob@example.org" }))
        .await;
    assert_eq!(status, 200, "{bob}");
    assert_eq!(bob["name"], "bob");
    assert_eq!(bob["email"], "bob@example.org");
    assert_eq!(bob["roles"], json!(["Application_Provider"]));
    assert_eq!(bob["_id"]["$oid"].as_str().unwrap().len(), 24, "{bob}");
    assert!(bob.get("password").is_none(), "{bob}");

    let token = server.token("bob", "bob-pw").await;
    let (status, res) = server.register(&token, "mallory", json!({})).await;
    assert_eq!(status, 403, "{res}");
    assert_eq!(res, json!({ "message": "You have not enough permissions!" }));
    let (status, res) = server.request("GET", "/api/users/", Some(&token), None).await;
    assert_eq!(status, 403, "{res}");
    let (status, res) = server
        .request("GET", "/api/organization", Some(&token), None)
        .await;
    assert_eq!(status, 403, "{res}");

    let (status, res) = server.register(&admin, "bob", json!({})).await;
    assert_eq!(status, 409, "{res}");
    assert_eq!(res, json!({ "message": "Username already exists" }));

    let (status, res) = server
        .register(&admin, "carol", json!({ "roles": ["Admin", "Wizard"] }))
        .await;
    assert_eq!(status, 422, "{res}");
    assert!(res["message"].as_str().unwrap().contains("Wizard"), "{res}");
    for bad in ["", "has space", "é", &"x".repeat(65)] {
        let (status, res) = server.register(&admin, bad, json!({})).await;
        assert_eq!(status, 422, "{bad:?}: {res}");
    }
    for password in [String::new(), "p".repeat(1025)] {
        let body = json!({ "name": "dave", "password": password });
        let (status, res) = server
            .request("POST", "/api/auth/register", Some(&admin), Some(body))
            .await;
        assert_eq!(status, 422, "{res}");
    }
    let (status, res) = server
        .register(&admin, "erin", json!({ "organization": "atlantis" }))
        .await;
    assert_eq!(status, 404, "{res}");
    // Nothing of the refused registrations was created.
    let (status, all) = server.request("GET", "/api/users", Some(&admin), None).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(names(&all), ["Admin", "bob"]);

    let (status, res) = server
        .register(
            &admin,
            "frank",
            json!({ "roles": ["Infrastructure_Provider", "Organization_Admin"] }),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    let frank = server.token("frank", "frank-pw").await;
    let (status, me) = server
        .request("GET", "/api/auth/whoami", Some(&frank), None)
        .await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        me["roles"],
        json!(["Infrastructure_Provider", "Organization_Admin"])
    );
    server.stop().await;
}

#[tokio::test]
async fn permissions_are_self_or_admin() {
    let server = Server::fresh().await;
    let admin = server.admin().await;
    server.register(&admin, "bob", json!({})).await;
    let bob = server.token("bob", "bob-pw").await;
    let (status, res) = server
        .request("GET", "/api/permission/bob", Some(&bob), None)
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res, json!({ "roles": ["Application_Provider"] }));
    let (status, res) = server
        .request("GET", "/api/permission/Admin/", Some(&bob), None)
        .await;
    assert_eq!(status, 403, "{res}");
    let (status, res) = server
        .request("GET", "/api/permission/bob", Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["roles"], json!(["Application_Provider"]));
    let (status, res) = server
        .request("GET", "/api/permission/nobody", Some(&admin), None)
        .await;
    assert_eq!(status, 404, "{res}");
    server.stop().await;
}

#[tokio::test]
async fn user_documents_are_self_or_admin_and_hold_no_hash() {
    let server = Server::fresh().await;
    let admin = server.admin().await;
    server
        .register(&admin, "bob", json!({ "created_at": "2024-01-01" }))
        .await;
    server.register(&admin, "alice", json!({})).await;
    let bob = server.token("bob", "bob-pw").await;

    let (status, doc) = server.request("GET", "/api/user/bob", Some(&bob), None).await;
    assert_eq!(status, 200, "{doc}");
    assert_eq!(doc["name"], "bob");
    assert_eq!(doc["created_at"], "2024-01-01");
    let orgs = doc["organizations"].as_array().unwrap();
    assert_eq!(orgs.len(), 1, "{doc}");
    assert_eq!(orgs[0]["organization_name"], "root");
    assert_eq!(orgs[0]["roles"], json!(["Application_Provider"]));
    let mut keys: Vec<&str> = doc.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        ["_id", "created_at", "email", "name", "organizations", "roles"]
    );
    // The roles in the caller's organization, as the reference adds them (the dashboard reads `user.roles`).
    assert_eq!(doc["roles"], json!(["Application_Provider"]));

    let (status, res) = server.request("GET", "/api/user/alice", Some(&bob), None).await;
    assert_eq!(status, 403, "{res}");
    let (status, res) = server
        .request("GET", "/api/user/alice/", Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["name"], "alice");
    let (status, res) = server
        .request("GET", "/api/user/nobody", Some(&admin), None)
        .await;
    assert_eq!(status, 404, "{res}");

    let (status, all) = server.request("GET", "/api/users/", Some(&admin), None).await;
    assert_eq!(status, 200, "{all}");
    assert_eq!(names(&all), ["Admin", "alice", "bob"]);
    let root_id = orgs[0]["organization_id"].as_str().unwrap();
    let (status, members) = server
        .request("GET", &format!("/api/users/{root_id}"), Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{members}");
    assert_eq!(names(&members), ["Admin", "alice", "bob"]);
    let (status, res) = server
        .request("GET", "/api/users/000000000000000000000000", Some(&admin), None)
        .await;
    assert_eq!(status, 404, "{res}");
    server.stop().await;
}

#[tokio::test]
async fn users_change_their_own_password() {
    let server = Server::fresh().await;
    let admin = server.admin().await;
    server.register(&admin, "bob", json!({})).await;
    let bob = server.token("bob", "bob-pw").await;
    let change = |old: &str, new: &str| json!({ "oldPassword": old, "newPassword": new });

    let (status, res) = server
        .request(
            "POST",
            "/api/user/bob",
            Some(&bob),
            Some(change("wrong", "new-pw")),
        )
        .await;
    assert_eq!(status, 400, "{res}");
    let (status, res) = server
        .request(
            "POST",
            "/api/user/bob",
            Some(&bob),
            Some(change("bob-pw", "bob-pw")),
        )
        .await;
    assert_eq!(status, 400, "{res}");
    let (status, res) = server
        .request("POST", "/api/user/bob", Some(&admin), Some(change("bob-pw", "x")))
        .await;
    assert_eq!(status, 403, "{res}");
    let (status, res) = server
        .request(
            "POST",
            "/api/user/bob",
            Some(&bob),
            Some(json!({ "oldPassword": "bob-pw" })),
        )
        .await;
    assert_eq!(status, 422, "{res}");
    // Refused attempts changed nothing.
    assert_eq!(server.login_as("bob", "bob-pw", None).await.0, 200);

    let (status, res) = server
        .request(
            "POST",
            "/api/user/bob/",
            Some(&bob),
            Some(change("bob-pw", "new-pw")),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res, json!({}));
    let (status, res) = server.login_as("bob", "bob-pw", None).await;
    assert_eq!(status, 401, "{res}");
    assert_eq!(server.login_as("bob", "new-pw", None).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn admin_updates_users() {
    let server = Server::fresh().await;
    let admin = server.admin().await;
    server.register(&admin, "bob", json!({})).await;
    let bob = server.token("bob", "bob-pw").await;

    let body =
        json!({ "email": "b@example.org", "roles": ["Infrastructure_Provider", "Application_Provider"] });
    let (status, res) = server
        .request("PUT", "/api/user/bob", Some(&admin), Some(body))
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res, json!({ "message": "ok" }));
    // New roles revoke bob's tokens (hardening.rs has the details); a fresh login sees the update.
    let (status, _) = server.request("GET", "/api/user/bob", Some(&bob), None).await;
    assert_eq!(status, 401);
    let bob = server.token("bob", "bob-pw").await;
    let (_, doc) = server.request("GET", "/api/user/bob", Some(&bob), None).await;
    assert_eq!(doc["email"], "b@example.org");
    let (_, perm) = server
        .request("GET", "/api/permission/bob", Some(&bob), None)
        .await;
    assert_eq!(
        perm["roles"],
        json!(["Infrastructure_Provider", "Application_Provider"])
    );

    let (status, res) = server
        .request(
            "PUT",
            "/api/user/bob",
            Some(&admin),
            Some(json!({ "roles": ["Superuser"] })),
        )
        .await;
    assert_eq!(status, 422, "{res}");
    assert!(res["message"].as_str().unwrap().contains("Superuser"), "{res}");
    let (status, res) = server
        .request("PUT", "/api/user/bob", Some(&bob), Some(json!({ "email": "x" })))
        .await;
    assert_eq!(status, 403, "{res}");
    let (status, res) = server
        .request(
            "PUT",
            "/api/user/nobody",
            Some(&admin),
            Some(json!({ "email": "x" })),
        )
        .await;
    assert_eq!(status, 404, "{res}");
    let (status, res) = server
        .request(
            "PUT",
            "/api/user/Admin",
            Some(&admin),
            Some(json!({ "roles": ["Application_Provider"] })),
        )
        .await;
    assert_eq!(status, 409, "{res}");
    let (_, perm) = server
        .request("GET", "/api/permission/Admin", Some(&admin), None)
        .await;
    assert_eq!(perm["roles"].as_array().unwrap().len(), 4, "{perm}");

    // The Admin sets a password (the replacement for the e-mail reset).
    let (status, res) = server
        .request(
            "PUT",
            "/api/user/bob/",
            Some(&admin),
            Some(json!({ "password": "set-by-admin" })),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(server.login_as("bob", "bob-pw", None).await.0, 401);
    assert_eq!(server.login_as("bob", "set-by-admin", None).await.0, 200);
    server.stop().await;
}

#[tokio::test]
async fn password_reset_by_mail_is_not_supported() {
    let server = Server::fresh().await;
    for (method, path) in [
        ("POST", "/api/user/"),
        ("PUT", "/api/user/"),
        ("POST", "/api/user"),
    ] {
        let body = json!({ "username": "bob", "domain": "example.org" });
        let (status, res) = server.request(method, path, None, Some(body)).await;
        assert_eq!(status, 501, "{method} {path}: {res}");
        let message = res["message"].as_str().unwrap();
        assert!(message.contains("PUT /api/user/<name>"), "{message}");
    }
    server.stop().await;
}

#[tokio::test]
async fn admin_deletes_users_but_not_admin_nor_itself() {
    let server = Server::fresh().await;
    let admin = server.admin().await;
    server.register(&admin, "bob", json!({})).await;
    server
        .register(&admin, "carol", json!({ "roles": ["Admin"] }))
        .await;
    let bob = server.token("bob", "bob-pw").await;
    let carol = server.token("carol", "carol-pw").await;

    let (status, res) = server
        .request("DELETE", "/api/user/Admin", Some(&carol), None)
        .await;
    assert_eq!(status, 409, "{res}");
    assert!(res["message"].as_str().unwrap().contains("Admin"), "{res}");
    let (status, res) = server
        .request("DELETE", "/api/user/carol", Some(&carol), None)
        .await;
    assert_eq!(status, 409, "{res}");
    let (status, res) = server
        .request("DELETE", "/api/user/carol", Some(&bob), None)
        .await;
    assert_eq!(status, 403, "{res}");

    let (status, remaining) = server
        .request("DELETE", "/api/user/bob", Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{remaining}");
    assert_eq!(names(&remaining), ["Admin", "carol"]);
    assert_eq!(server.login_as("bob", "bob-pw", None).await.0, 401);
    // Deleting bob revoked his tokens.
    let (status, res) = server.request("GET", "/api/user/bob", Some(&bob), None).await;
    assert_eq!(status, 401, "{res}");
    let (status, res) = server.request("GET", "/api/user/bob", Some(&admin), None).await;
    assert_eq!(status, 404, "{res}");
    let (status, res) = server
        .request("DELETE", "/api/user/bob/", Some(&admin), None)
        .await;
    assert_eq!(status, 404, "{res}");
    // Bob's memberships went with him.
    let (_, orgs) = server
        .request("GET", "/api/organization/", Some(&admin), None)
        .await;
    assert_eq!(orgs[0]["member"].as_array().unwrap().len(), 2, "{orgs}");
    server.stop().await;
}

#[tokio::test]
async fn organizations_lifecycle() {
    let server = Server::fresh().await;
    let admin = server.admin().await;
    let (_, bob) = server.register(&admin, "bob", json!({})).await;
    let bob_id = bob["_id"]["$oid"].as_str().unwrap().to_owned();

    let (status, orgs) = server
        .request("GET", "/api/organization/", Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{orgs}");
    assert_eq!(orgs.as_array().unwrap().len(), 1, "{orgs}");
    assert_eq!(orgs[0]["name"], "root");
    let root_id = orgs[0]["_id"]["$oid"].as_str().unwrap().to_owned();
    assert_eq!(orgs[0]["member"].as_array().unwrap().len(), 2, "{orgs}");

    let body = json!({ "name": "edge", "member": [{ "user_id": bob_id, "roles": ["Organization_Admin"] }] });
    let (status, created) = server
        .request("POST", "/api/organization", Some(&admin), Some(body))
        .await;
    assert_eq!(status, 200, "{created}");
    // The reference's answer: the new id, JSON-encoded inside a JSON string.
    let edge_id: String = serde_json::from_str(created.as_str().unwrap()).unwrap();
    let (status, edge) = server
        .request("GET", &format!("/api/organization/{edge_id}"), Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{edge}");
    assert_eq!(edge["_id"]["$oid"], json!(edge_id));
    assert_eq!(edge["name"], "edge");
    assert_eq!(
        edge["member"],
        json!([{ "user_id": bob_id, "roles": ["Organization_Admin"] }])
    );

    // Bob can log in to it and holds the roles given there.
    let (status, res) = server.login_as("bob", "bob-pw", Some("edge")).await;
    assert_eq!(status, 200, "{res}");
    let bob_edge = res["token"].as_str().unwrap().to_owned();
    let (_, perm) = server
        .request("GET", "/api/permission/bob", Some(&bob_edge), None)
        .await;
    assert_eq!(perm["roles"], json!(["Organization_Admin"]));

    let refusals = [
        (json!({ "name": "edge" }), 409),
        (json!({ "name": "root" }), 409),
        (json!({ "name": "bad name" }), 422),
        (json!({}), 422),
        (
            json!({ "name": "x", "member": [{ "user_id": "000000000000000000000000", "roles": [] }] }),
            422,
        ),
        (
            json!({ "name": "y", "member": [{ "user_id": bob_id, "roles": ["Pirate"] }] }),
            422,
        ),
        (
            json!({ "name": "z", "member": [{ "user_id": bob_id, "roles": [] }, { "user_id": bob_id, "roles": [] }] }),
            422,
        ),
    ];
    for (body, expected) in refusals {
        let (status, res) = server
            .request("POST", "/api/organization/", Some(&admin), Some(body.clone()))
            .await;
        assert_eq!(status, expected, "{body}: {res}");
    }

    let (status, fog) = server
        .request(
            "PUT",
            &format!("/api/organization/{edge_id}"),
            Some(&admin),
            Some(json!({ "name": "fog" })),
        )
        .await;
    assert_eq!(status, 200, "{fog}");
    assert_eq!(fog["name"], "fog");
    assert_eq!(fog["member"].as_array().unwrap().len(), 1, "members kept: {fog}");
    let (status, res) = server
        .request(
            "PUT",
            &format!("/api/organization/{edge_id}"),
            Some(&admin),
            Some(json!({ "name": "root" })),
        )
        .await;
    assert_eq!(status, 409, "{res}");
    let (status, res) = server
        .request(
            "PUT",
            &format!("/api/organization/{root_id}"),
            Some(&admin),
            Some(json!({ "name": "trunk" })),
        )
        .await;
    assert_eq!(status, 409, "{res}");
    let (status, res) = server
        .request(
            "PUT",
            &format!("/api/organization/{root_id}"),
            Some(&admin),
            Some(json!({ "member": [] })),
        )
        .await;
    assert_eq!(status, 409, "{res}");
    let (status, res) = server
        .request(
            "PUT",
            "/api/organization/000000000000000000000000",
            Some(&admin),
            Some(json!({ "name": "q" })),
        )
        .await;
    assert_eq!(status, 404, "{res}");

    // Register straight into the renamed organization; its member list then has both.
    let (status, res) = server
        .register(&admin, "gina", json!({ "organization": "fog" }))
        .await;
    assert_eq!(status, 200, "{res}");
    let (status, members) = server
        .request("GET", &format!("/api/users/{edge_id}/"), Some(&admin), None)
        .await;
    assert_eq!(status, 200, "{members}");
    assert_eq!(names(&members), ["bob", "gina"]);
    let (status, res) = server.login_as("gina", "gina-pw", Some("fog")).await;
    assert_eq!(status, 200, "{res}");

    // Replace the members: only gina stays.
    let gina_id = members[1]["_id"]["$oid"].as_str().unwrap().to_owned();
    let body = json!({ "member": [{ "user_id": gina_id, "roles": ["Application_Provider"] }] });
    let (status, res) = server
        .request(
            "PUT",
            &format!("/api/organization/{edge_id}/"),
            Some(&admin),
            Some(body),
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["member"].as_array().unwrap().len(), 1, "{res}");
    assert_eq!(server.login_as("bob", "bob-pw", Some("fog")).await.0, 403);

    let (status, res) = server
        .request(
            "DELETE",
            &format!("/api/organization/{root_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 409, "{res}");
    let (status, res) = server
        .request(
            "DELETE",
            &format!("/api/organization/{edge_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res, json!({ "message": "ok" }));
    let (status, res) = server
        .request(
            "DELETE",
            &format!("/api/organization/{edge_id}/"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 404, "{res}");
    let (_, orgs) = server
        .request("GET", "/api/organization", Some(&admin), None)
        .await;
    assert_eq!(orgs.as_array().unwrap().len(), 1, "{orgs}");
    assert_eq!(server.login_as("gina", "gina-pw", Some("fog")).await.0, 404);
    // Gina is still a user, now without organizations.
    let (_, doc) = server.request("GET", "/api/user/gina", Some(&admin), None).await;
    assert_eq!(doc["organizations"], json!([]));
    server.stop().await;
}

#[tokio::test]
async fn every_route_needs_a_token() {
    let server = Server::fresh().await;
    let routes = [
        ("POST", "/api/auth/register"),
        ("GET", "/api/permission/Admin"),
        ("GET", "/api/user/Admin"),
        ("PUT", "/api/user/Admin"),
        ("DELETE", "/api/user/Admin"),
        ("POST", "/api/user/Admin"),
        ("GET", "/api/users/"),
        ("GET", "/api/users/000000000000000000000000"),
        ("GET", "/api/organization/"),
        ("POST", "/api/organization/"),
        ("GET", "/api/organization/000000000000000000000000"),
        ("PUT", "/api/organization/000000000000000000000000"),
        ("DELETE", "/api/organization/000000000000000000000000"),
    ];
    for (method, path) in routes {
        for token in [None, Some("garbage")] {
            let (status, res) = server.request(method, path, token, Some(json!({}))).await;
            assert_eq!(status, 401, "{method} {path} {token:?}: {res}");
            assert_eq!(res, json!({ "message": "Missing authentication token" }));
        }
    }
    // Admin still exists with its password: nothing above changed anything.
    assert_eq!(server.login_as("Admin", "Admin", None).await.0, 200);
    server.stop().await;
}
