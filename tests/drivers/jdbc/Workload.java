// The PostgreSQL JDBC driver (Debian's libpostgresql-jdbc-java) through pglease: the driver
// workload of tests/drivers.rs, run as a single-file program:
//   java -cp /usr/share/java/postgresql.jar Workload.java
// TLS verified against the test CA (sslmode=verify-full); SCRAM-SHA-256 (this driver version has
// no channel binding). Connection settings come from the PG* environment variables. Prints
// "ok <name>" per check and exits non-zero at the first failure.

import java.io.StringReader;
import java.io.StringWriter;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.util.Properties;

import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class Workload {
    static void check(String name, boolean cond, String detail) {
        if (!cond) {
            System.out.println("FAIL " + name + " " + detail);
            System.exit(1);
        }
        System.out.println("ok " + name);
    }

    static Connection connect(String mode) throws SQLException {
        String url = "jdbc:postgresql://" + System.getenv("PGHOST") + ":" + System.getenv("PGPORT") + "/" + System.getenv("PGDATABASE");
        Properties p = new Properties();
        p.setProperty("user", System.getenv("PGUSER"));
        p.setProperty("password", System.getenv("PGPASSWORD"));
        p.setProperty("sslmode", "verify-full");
        p.setProperty("sslrootcert", System.getenv("PGSSLROOTCERT"));
        p.setProperty("preferQueryMode", mode);
        p.setProperty("prepareThreshold", "3");
        return DriverManager.getConnection(url, p);
    }

    public static void main(String[] args) throws Exception {
        String marker = System.getenv("DRIVER_MARKER");
        try (Connection conn = connect("extended"); Connection simple = connect("simple")) {
            check("tls", conn.isValid(5), "");

            // Simple protocol, several statements in one message.
            try (Statement st = simple.createStatement()) {
                boolean isResult = st.execute("INSERT INTO t VALUES (100); SELECT count(*) FROM t WHERE id = 100");
                check("simple insert", !isResult && st.getUpdateCount() == 1, "");
                check("simple select", st.getMoreResults(), "");
                try (ResultSet rs = st.getResultSet()) {
                    rs.next();
                    check("simple multi-statement", rs.getInt(1) == 1, "");
                }
            }

            // Extended protocol; after prepareThreshold executions the driver switches to a named
            // server-side statement with binary transfer of int4.
            try (PreparedStatement ps = conn.prepareStatement("SELECT id + ? FROM t WHERE id = ?")) {
                for (int i = 0; i < 6; i++) {
                    ps.setInt(1, i);
                    ps.setInt(2, 100);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        check("extended #" + i, rs.getInt(1) == 100 + i, "");
                    }
                }
            }
            try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int4 * 2, ?::bytea, ?::text")) {
                for (int i = 0; i < 4; i++) {
                    ps.setInt(1, 21);
                    ps.setBytes(2, new byte[] {0, 1, (byte) 0xff});
                    ps.setString(3, "h\u00e9llo");
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        byte[] b = rs.getBytes(2);
                        check("binary #" + i, rs.getInt(1) == 42 && b.length == 3 && b[2] == (byte) 0xff && rs.getString(3).equals("h\u00e9llo"), "");
                    }
                }
            }

            // Transactions and savepoints.
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("INSERT INTO t VALUES (101)");
                Savepoint sp = conn.setSavepoint("s");
                st.executeUpdate("INSERT INTO t VALUES (102)");
                try {
                    st.executeQuery("SELECT 1 / 0");
                    check("division by zero", false, "");
                } catch (SQLException e) {
                    check("division by zero", "22012".equals(e.getSQLState()), e.getSQLState());
                }
                conn.rollback(sp);
                conn.commit();
            }
            conn.setAutoCommit(true);
            try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery("SELECT string_agg(id::text, ',' ORDER BY id) FROM t WHERE id IN (101, 102)")) {
                rs.next();
                check("savepoint rolled back, transaction committed", "101".equals(rs.getString(1)), rs.getString(1));
            }

            // COPY in and out.
            CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
            long in = copy.copyIn("COPY t (id) FROM STDIN", new StringReader("200\n201\n202\n"));
            StringWriter out = new StringWriter();
            copy.copyOut("COPY (SELECT id FROM t WHERE id >= 200 ORDER BY id) TO STDOUT", out);
            check("copy in and out", in == 3 && out.toString().equals("200\n201\n202\n"), out.toString());

            // LISTEN / NOTIFY between two sessions.
            try (Statement st = conn.createStatement(); Statement other = simple.createStatement()) {
                st.execute("LISTEN driver_channel");
                other.execute("NOTIFY driver_channel, 'hello'");
                PGNotification[] got = conn.unwrap(PGConnection.class).getNotifications(10_000);
                check("listen/notify", got != null && got.length == 1 && got[0].getParameter().equals("hello"), "");
            }

            // Cancel a running statement from another thread; the session goes on.
            try (Statement st = conn.createStatement()) {
                Thread canceller = new Thread(() -> {
                    try {
                        Thread.sleep(500);
                        st.cancel();
                    } catch (Exception e) {
                        throw new RuntimeException(e);
                    }
                });
                canceller.start();
                long started = System.nanoTime();
                try {
                    st.executeQuery("SELECT pg_sleep(30)");
                    check("cancel", false, "pg_sleep was not cancelled");
                } catch (SQLException e) {
                    check("cancel", "57014".equals(e.getSQLState()) && System.nanoTime() - started < 10_000_000_000L, e.getSQLState());
                }
                canceller.join();
                try (ResultSet rs = st.executeQuery("SELECT 1")) {
                    rs.next();
                    check("after cancel", rs.getInt(1) == 1, "");
                }
            }

            // A statement the scope denies: SQLSTATE 42501, and the session goes on.
            try (Statement st = conn.createStatement()) {
                try {
                    st.executeQuery("SELECT * FROM people /* " + marker + " */");
                    check("denied", false, "people was readable");
                } catch (SQLException e) {
                    check("denied", "42501".equals(e.getSQLState()) && e.getMessage().contains("scope"), e.getMessage());
                }
                try (ResultSet rs = st.executeQuery("SELECT count(*) FROM t WHERE id = 100")) {
                    rs.next();
                    check("after denial", rs.getInt(1) == 1, "");
                }
            }

            // The driver names itself (ApplicationName, a startup parameter) and sees that name
            // back; setClientInfo runs SET application_name. pg_stat_activity shows the stamp.
            try (Statement st = conn.createStatement()) {
                try (ResultSet rs = st.executeQuery("SHOW application_name")) {
                    rs.next();
                    check("application_name", "PostgreSQL JDBC Driver".equals(rs.getString(1)), rs.getString(1));
                }
                conn.setClientInfo("ApplicationName", "jdbc-app");
                check("setClientInfo", "jdbc-app".equals(conn.getClientInfo("ApplicationName")), "");
                try (ResultSet rs = st.executeQuery("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()")) {
                    rs.next();
                    String stamped = rs.getString(1);
                    check("pg_stat_activity stamp", stamped.startsWith("pglease alice ") && stamped.endsWith(" / jdbc-app"), stamped);
                }
            }
        }
        System.out.println("done");
    }
}
