/*
 * argus_sub_acl: a Mosquitto 2.0 plugin that authorises SUBSCRIBE, which Mosquitto 2.0's
 * acl_file does not do (it grants every subscription and only filters deliveries).
 *
 * Why: a device that subscribes to $share/bridge/devices/+/telemetry joins the bridge's
 * shared-subscription group and is handed its round-robin share of every message; the
 * acl_file then drops those deliveries, so the bridge never sees them (lost messages).
 *
 * Policy: a SUBSCRIBE is allowed only if a `plugin_opt_subscribe` line names the client's
 * username (= certificate CN with use_identity_as_username) and the exact topic filter:
 *
 *     plugin /path/to/argus_sub_acl.so
 *     plugin_opt_subscribe bridge-* $share/bridge/devices/+/telemetry
 *     plugin_opt_subscribe monitor $SYS/broker/store/messages/count
 *
 * The user part is an exact username, or a prefix ending in `*`. The filter is compared as a
 * string (no wildcard matching), so `devices/+/telemetry` does not allow `devices/#`.
 * Everything else is refused (SUBACK 0x80). Publish and delivery are not decided here: they
 * are deferred to the acl_file. UNSUBSCRIBE is deferred too.
 *
 * Revocation cuts live sessions: the CRL refuses a revoked certificate at the next TLS
 * handshake, but Mosquitto's SIGHUP reload leaves open connections alone. With
 *
 *     plugin_opt_revoked_identities /path/to/pki/revoked-identities.txt
 *
 * (one line per revoked certificate, "<identity> <serial>", written by argus-pki beside the
 * CRL, pki/src/ca.rs) the plugin looks at the file on every broker tick (at most every
 * 200 ms) and, for each *new* line, disconnects the clients whose username is its identity
 * (mosquitto_kick_client_by_username),
 * at once and again 1 s and 3 s later: a reconnect that raced the broker's CRL reload is cut
 * too, and once the CRL is loaded the handshake refuses it. Identities listed when the broker
 * starts are not kicked (the CRL already refuses them). A device that rotated to a new
 * certificate before its old one was revoked is disconnected once and reconnects.
 *
 * Build (no Mosquitto headers needed; the broker exports the functions declared below):
 *     cc -shared -fPIC -O2 -Wall -Wextra -o argus_sub_acl.so argus_sub_acl.c
 *
 * Written against the Mosquitto 2.0.11 plugin API (version 5, include/mosquitto_broker.h).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

/* --- The subset of mosquitto.h / mosquitto_broker.h / mosquitto_plugin.h used here. ------ */
#define MOSQ_EVT_ACL_CHECK 2
#define MOSQ_EVT_TICK 9
#define MOSQ_ACL_SUBSCRIBE 0x04
#define MOSQ_ERR_SUCCESS 0
#define MOSQ_ERR_NOMEM 1
#define MOSQ_ERR_INVAL 3
#define MOSQ_ERR_ACL_DENIED 12
#define MOSQ_ERR_PLUGIN_DEFER 17
#define MOSQ_LOG_ERR (1 << 3)
#define MOSQ_LOG_NOTICE (1 << 1)

struct mosquitto;
typedef struct mosquitto_plugin_id_t mosquitto_plugin_id_t;
struct mosquitto_opt {
	char *key;
	char *value;
};
struct mosquitto_evt_acl_check {
	void *future;
	struct mosquitto *client;
	const char *topic;
	const void *payload;
	void *properties;
	int access;
	uint32_t payloadlen;
	uint8_t qos;
	bool retain;
	void *future2[4];
};
typedef int (*MOSQ_FUNC_generic_callback)(int, void *, void *);

int mosquitto_callback_register(mosquitto_plugin_id_t *identifier, int event,
		MOSQ_FUNC_generic_callback cb_func, const void *event_data, void *userdata);
int mosquitto_callback_unregister(mosquitto_plugin_id_t *identifier, int event,
		MOSQ_FUNC_generic_callback cb_func, const void *event_data);
const char *mosquitto_client_username(const struct mosquitto *client);
int mosquitto_kick_client_by_username(const char *username, bool with_will);
const char *mosquitto_client_id(const struct mosquitto *client);
void mosquitto_log_printf(int level, const char *fmt, ...);

/* --- The rules. ----------------------------------------------------------------------- */
struct rule {
	char *user;    /* exact username, or prefix when `prefix` */
	bool prefix;
	char *filter;  /* exact topic filter */
};

static mosquitto_plugin_id_t *plugin_id;
static struct rule *rules;
static int rule_count;

static bool rule_matches(const struct rule *r, const char *username, const char *filter)
{
	if(strcmp(r->filter, filter) != 0) return false;
	if(r->prefix) return strncmp(r->user, username, strlen(r->user)) == 0;
	return strcmp(r->user, username) == 0;
}

static int acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *username;
	const char *id;
	int i;

	(void)event;
	(void)userdata;
	if(ed->access != MOSQ_ACL_SUBSCRIBE) return MOSQ_ERR_PLUGIN_DEFER;

	username = mosquitto_client_username(ed->client);
	if(username && ed->topic){
		for(i = 0; i < rule_count; i++){
			if(rule_matches(&rules[i], username, ed->topic)) return MOSQ_ERR_SUCCESS;
		}
	}
	id = mosquitto_client_id(ed->client);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "argus_sub_acl: denied SUBSCRIBE to \"%s\" by client \"%s\" (username \"%s\")",
			ed->topic ? ed->topic : "", id ? id : "", username ? username : "");
	return MOSQ_ERR_ACL_DENIED;
}

/* Parses "<user>[*] <filter>" into a rule. */
static int parse_rule(const char *value, struct rule *r)
{
	const char *sp = strchr(value, ' ');
	const char *filter;
	size_t ulen;

	if(!sp || sp == value) return MOSQ_ERR_INVAL;
	filter = sp;
	while(*filter == ' ' || *filter == '\t') filter++;
	if(!*filter || strchr(filter, ' ') || strchr(filter, '\t')) return MOSQ_ERR_INVAL;
	ulen = (size_t)(sp - value);
	r->prefix = value[ulen - 1] == '*';
	if(r->prefix) ulen--;
	if(ulen == 0) return MOSQ_ERR_INVAL; /* "*" alone would allow everyone */
	r->user = strndup(value, ulen);
	r->filter = strdup(filter);
	if(!r->user || !r->filter) return MOSQ_ERR_NOMEM;
	return MOSQ_ERR_SUCCESS;
}

static void free_rules(void)
{
	int i;
	for(i = 0; i < rule_count; i++){
		free(rules[i].user);
		free(rules[i].filter);
	}
	free(rules);
	rules = NULL;
	rule_count = 0;
}

/* --- Revoked identities: cut the live sessions of newly revoked certificates. ----------- */
#define KICK_DELAYS 3
static const long kick_delay_ms[KICK_DELAYS] = {0, 1000, 3000};

struct kick {
	char *user;
	long due_ms[KICK_DELAYS];
	int done;
};

static char *revoked_path;
static char **known;       /* lines of the file as last read */
static int known_count;
static struct kick *kicks; /* identities of new lines, still to be kicked */
static int kick_count;
static long last_look_ms;
static struct stat last_st;
static bool have_st;

static long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static bool is_known(char **list, int n, const char *user)
{
	int i;
	for(i = 0; i < n; i++){
		if(strcmp(list[i], user) == 0) return true;
	}
	return false;
}

static void free_list(char **list, int n)
{
	int i;
	for(i = 0; i < n; i++) free(list[i]);
	free(list);
}

/* Reads the file; the identities of lines not in `known` are queued for kicking when `kick_new`. */
static void read_revoked(bool kick_new)
{
	FILE *f = fopen(revoked_path, "r");
	char line[512];
	char **list = NULL;
	int n = 0, cap = 0, i;

	if(!f) return; /* no file yet: nothing revoked */
	while(fgets(line, sizeof(line), f)){
		size_t len = strcspn(line, "\r\n");
		line[len] = '\0';
		if(len == 0 || is_known(list, n, line)) continue;
		if(n == cap){
			char **grown = realloc(list, (size_t)(cap ? cap * 2 : 64) * sizeof(char *));
			if(!grown) break;
			list = grown;
			cap = cap ? cap * 2 : 64;
		}
		list[n] = strdup(line);
		if(!list[n]) break;
		n++;
	}
	fclose(f);
	if(kick_new){
		for(i = 0; i < n; i++){
			struct kick *grown;
			int d;
			if(is_known(known, known_count, list[i])) continue;
			grown = realloc(kicks, (size_t)(kick_count + 1) * sizeof(struct kick));
			if(!grown) break;
			kicks = grown;
			/* The identity is the line up to its first space. */
			kicks[kick_count].user = strndup(list[i], strcspn(list[i], " "));
			if(!kicks[kick_count].user) break;
			for(d = 0; d < KICK_DELAYS; d++) kicks[kick_count].due_ms[d] = now_ms() + kick_delay_ms[d];
			kicks[kick_count].done = 0;
			kick_count++;
		}
	}
	free_list(known, known_count);
	known = list;
	known_count = n;
}

static int on_tick(int event, void *event_data, void *userdata)
{
	struct stat st;
	long now = now_ms();
	int i, kept = 0;

	(void)event;
	(void)event_data;
	(void)userdata;
	if(now - last_look_ms >= 200){
		last_look_ms = now;
		if(stat(revoked_path, &st) == 0 && (!have_st || st.st_mtim.tv_sec != last_st.st_mtim.tv_sec
				|| st.st_mtim.tv_nsec != last_st.st_mtim.tv_nsec || st.st_size != last_st.st_size
				|| st.st_ino != last_st.st_ino)){
			last_st = st;
			have_st = true;
			read_revoked(true);
		}
	}
	for(i = 0; i < kick_count; i++){
		struct kick *k = &kicks[i];
		while(k->done < KICK_DELAYS && k->due_ms[k->done] <= now){
			if(k->done == 0){
				mosquitto_log_printf(MOSQ_LOG_NOTICE, "argus_sub_acl: certificate identity \"%s\" revoked; disconnecting its clients", k->user);
			}
			mosquitto_kick_client_by_username(k->user, false);
			k->done++;
		}
		if(k->done < KICK_DELAYS){
			kicks[kept++] = *k;
		}else{
			free(k->user);
		}
	}
	kick_count = kept;
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	(void)supported_version_count;
	(void)supported_versions;
	return 5;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata,
		struct mosquitto_opt *options, int option_count)
{
	int i;
	int rc;

	(void)userdata;
	plugin_id = identifier;
	rules = calloc((size_t)(option_count > 0 ? option_count : 1), sizeof(struct rule));
	if(!rules) return MOSQ_ERR_NOMEM;
	for(i = 0; i < option_count; i++){
		if(strcmp(options[i].key, "revoked_identities") == 0){
			free(revoked_path);
			revoked_path = strdup(options[i].value);
			if(!revoked_path){
				free_rules();
				return MOSQ_ERR_NOMEM;
			}
			continue;
		}
		if(strcmp(options[i].key, "subscribe") != 0){
			mosquitto_log_printf(MOSQ_LOG_ERR, "argus_sub_acl: unknown option plugin_opt_%s", options[i].key);
			free_rules();
			return MOSQ_ERR_INVAL;
		}
		rc = parse_rule(options[i].value, &rules[rule_count]);
		if(rc != MOSQ_ERR_SUCCESS){
			mosquitto_log_printf(MOSQ_LOG_ERR, "argus_sub_acl: bad plugin_opt_subscribe \"%s\" (want: USER[*] FILTER)", options[i].value);
			rule_count++; /* free what was allocated */
			free_rules();
			return rc;
		}
		rule_count++;
	}
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "argus_sub_acl: %d subscribe rule(s); every other SUBSCRIBE is refused", rule_count);
	rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL, NULL);
	if(rc != MOSQ_ERR_SUCCESS || !revoked_path) return rc;
	if(stat(revoked_path, &last_st) == 0) have_st = true;
	read_revoked(false);
	mosquitto_log_printf(MOSQ_LOG_NOTICE, "argus_sub_acl: watching %s (%d revoked identities)", revoked_path, known_count);
	return mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL);
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, acl_check, NULL);
	if(revoked_path) mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	free_rules();
	free_list(known, known_count);
	known = NULL;
	known_count = 0;
	for(int i = 0; i < kick_count; i++) free(kicks[i].user);
	free(kicks);
	kicks = NULL;
	kick_count = 0;
	free(revoked_path);
	revoked_path = NULL;
	return MOSQ_ERR_SUCCESS;
}
