-- A portal database as commit d276bc8 (version 0.1.0, before schema migrations) wrote it, with a stopped
-- service and its events: its own create_app() made the tables, its models the rows; dumped by sqlite3 .dump.
PRAGMA foreign_keys=OFF;
BEGIN TRANSACTION;
CREATE TABLE services (
	id VARCHAR(16) NOT NULL, 
	name VARCHAR(100) NOT NULL, 
	kind VARCHAR(40) NOT NULL, 
	engine VARCHAR(40), 
	health_path VARCHAR(200), 
	model VARCHAR(300) NOT NULL, 
	revision VARCHAR(100), 
	tier VARCHAR(100), 
	state VARCHAR(16) NOT NULL, 
	reason TEXT, 
	scheduler VARCHAR(16) NOT NULL, 
	job_id VARCHAR(40), 
	job_dir VARCHAR(500) NOT NULL, 
	resources_json TEXT NOT NULL, 
	engine_args_json TEXT NOT NULL, 
	time_limit INTEGER NOT NULL, 
	api_key VARCHAR(100) NOT NULL, 
	host VARCHAR(255), 
	port INTEGER, 
	node VARCHAR(255), 
	stop_requested BOOLEAN NOT NULL, 
	health_failures INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	submitted_at DATETIME, 
	job_started_at DATETIME, 
	endpoint_at DATETIME, 
	ready_at DATETIME, 
	ended_at DATETIME, 
	last_activity DATETIME, 
	PRIMARY KEY (id)
);
INSERT INTO services VALUES('a1b2c3d4e5f60718','tiny-chat','text-generation','vllm','/health','test/tiny','main','Tiny','STOPPED','stopped by the user','local','4242','/home/user/.pilotfish/jobs/a1b2c3d4e5f60718','{"cpus": 1, "memory_gb": 0.25, "gpus": 0}','["--delay", "0"]',30,'pf-svc-0123456789abcdef','127.0.0.1',40123,'localhost',1,0,'2025-03-14 09:26:53.000000','2025-03-14 09:26:54.000000','2025-03-14 09:26:55.000000','2025-03-14 09:26:58.000000','2025-03-14 09:27:00.000000','2025-03-14 09:27:53.000000','2025-03-14 09:27:23.000000');
CREATE TABLE conditions (
	name VARCHAR(40) NOT NULL, 
	ok BOOLEAN NOT NULL, 
	message TEXT, 
	since DATETIME NOT NULL, 
	checked_at DATETIME NOT NULL, 
	PRIMARY KEY (name)
);
INSERT INTO conditions VALUES('scheduler',1,NULL,'2025-03-14 09:26:53.000000','2025-03-14 09:27:53.000000');
CREATE TABLE api_keys (
	id VARCHAR(16) NOT NULL, 
	name VARCHAR(60) NOT NULL, 
	key_hash VARCHAR(64) NOT NULL, 
	hint VARCHAR(16) NOT NULL, 
	created_at DATETIME NOT NULL, 
	revoked_at DATETIME, 
	PRIMARY KEY (id)
);
INSERT INTO api_keys VALUES('k1','notebook','0000000000000000000000000000000000000000000000000000000000000000','pf-…abcd','2025-03-14 09:26:53.000000',NULL);
CREATE TABLE model_inventory (
	repo_id VARCHAR(200) NOT NULL, 
	kind VARCHAR(40), 
	size_bytes BIGINT NOT NULL, 
	data_json TEXT NOT NULL, 
	scanned_at DATETIME NOT NULL, 
	PRIMARY KEY (repo_id)
);
INSERT INTO model_inventory VALUES('test/tiny','text-generation',123456,'{"repo_id": "test/tiny"}','2025-03-14 09:26:53.000000');
CREATE TABLE downloads (
	id VARCHAR(32) NOT NULL, 
	repo_id VARCHAR(200) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	data_json TEXT NOT NULL, 
	cancel_requested BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
CREATE TABLE benchmark_runs (
	id VARCHAR(16) NOT NULL, 
	service_id VARCHAR(16) NOT NULL, 
	service_name VARCHAR(100), 
	kind VARCHAR(40), 
	model VARCHAR(300) NOT NULL, 
	tier VARCHAR(100), 
	state VARCHAR(16) NOT NULL, 
	mode VARCHAR(16) NOT NULL, 
	target VARCHAR(16) NOT NULL, 
	params_json TEXT NOT NULL, 
	summary_json TEXT, 
	result_json TEXT, 
	error TEXT, 
	pid INTEGER, 
	pid_started FLOAT, 
	created_at DATETIME NOT NULL, 
	finished_at DATETIME, 
	PRIMARY KEY (id)
);
INSERT INTO benchmark_runs VALUES('b1','a1b2c3d4e5f60718','tiny-chat','text-generation','test/tiny','Tiny','DONE','load','portal','{}','{}','{}',NULL,NULL,NULL,'2025-03-14 09:26:53.000000','2025-03-14 09:28:23.000000');
CREATE TABLE events (
	id INTEGER NOT NULL, 
	service_id VARCHAR(16) NOT NULL, 
	at DATETIME NOT NULL, 
	from_state VARCHAR(16), 
	to_state VARCHAR(16) NOT NULL, 
	reason TEXT, 
	PRIMARY KEY (id), 
	FOREIGN KEY(service_id) REFERENCES services (id) ON DELETE CASCADE
);
INSERT INTO events VALUES(1,'a1b2c3d4e5f60718','2025-03-14 09:26:53.000000',NULL,'SUBMITTED','submitted as job 4242');
INSERT INTO events VALUES(2,'a1b2c3d4e5f60718','2025-03-14 09:27:03.000000','SUBMITTED','STARTING','job running on localhost');
INSERT INTO events VALUES(3,'a1b2c3d4e5f60718','2025-03-14 09:27:13.000000','STARTING','RUNNING','healthy');
INSERT INTO events VALUES(4,'a1b2c3d4e5f60718','2025-03-14 09:27:23.000000','RUNNING','STOPPED','stopped by the user');
CREATE INDEX ix_services_state ON services (state);
CREATE UNIQUE INDEX ix_api_keys_key_hash ON api_keys (key_hash);
CREATE INDEX ix_benchmark_runs_service_id ON benchmark_runs (service_id);
CREATE INDEX ix_benchmark_runs_model ON benchmark_runs (model);
CREATE INDEX ix_events_service_id ON events (service_id);
COMMIT;
